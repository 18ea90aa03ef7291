"""HTTP/1.1 by hand over a raw socket, for what no client library will send (malformed heads, slow bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]  # lower-cased names; the last of a repeated header
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str:
        error = self.json()["error"]
        assert set(error) == {"message", "type", "code"} and error["message"], error
        return str(error["code"])


def parse_reply(raw: bytes) -> RawReply:
    """The first final response in ``raw`` (a 100 Continue before it is skipped)."""
    while raw.startswith(b"HTTP/1.1 100"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawReply(status, headers, body)


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:  # noqa: ASYNC109 - a test helper's bound
    """Send ``data``, then read until the server closes the connection (bounded by ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except ConnectionResetError:
        pass  # closed with bytes of ours unread: what came before the reset is the answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return bytes(received)


async def read_reply(reader: asyncio.StreamReader, timeout: float = 5.0) -> RawReply:  # noqa: ASYNC109
    """One response with a Content-Length body from a kept-alive connection."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        while head.startswith(b"HTTP/1.1 1"):
            head = await reader.readuntil(b"\r\n\r\n")
        reply = parse_reply(head)
        reply.body = await reader.readexactly(int(reply.headers.get("content-length", "0")))
    return reply
