"""Send one batch line to the backend its claim holds, and tell how it went as a value.

A line is never streamed: its answer is read whole (bounded by ``MAX_RESPONSE_BYTES``). ``Answered`` is
any HTTP answer (the runner decides what a 5xx means); ``NoAnswer`` is a backend that failed before
answering (refused, dropped, timed out), which the runner retries on another backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

from llmbalancer.config import TimeoutsConfig
from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.usage import TAIL_BYTES, Usage, read_usage

MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Answered:
    status: int
    body: bytes
    usage: Usage | None
    ttfb: float  # seconds to the response's head
    latency: float  # seconds to its end


@dataclass(frozen=True, slots=True)
class NoAnswer:
    reason: str
    unreachable: bool  # it could not be reached at all (the claim guard takes it out of rotation)


Outcome = Answered | NoAnswer


def open_session(timeouts: TimeoutsConfig) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        # llama-server closes idle keep-alive connections after 5 s: drop ours first (as the proxy does).
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect, sock_read=timeouts.first_byte),
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def send(session: aiohttp.ClientSession, backend: Backend, path: str, body: bytes, request_id: str) -> Outcome:
    started = time.monotonic()
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id, **backend.auth_headers}
    try:
        async with session.post(backend.url + path, data=body, headers=headers, allow_redirects=False) as reply:
            ttfb = time.monotonic() - started
            data = await _read_bounded(reply)
            if data is None:
                return NoAnswer(f"answer larger than {MAX_RESPONSE_BYTES} bytes", unreachable=False)
            return Answered(reply.status, data, _usage(data), ttfb, time.monotonic() - started)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        return NoAnswer(_describe(exc), unreachable=True)
    except aiohttp.ClientError as exc:
        return NoAnswer(_describe(exc), unreachable=False)
    except TimeoutError:
        return NoAnswer("no answer in time (timeouts.first_byte)", unreachable=False)


async def _read_bounded(reply: aiohttp.ClientResponse) -> bytes | None:
    declared = reply.content_length
    if declared is not None and declared > MAX_RESPONSE_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in reply.content.iter_any():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _usage(body: bytes) -> Usage | None:
    """Token counts at the end of an answer (completions), else at its start (llama.cpp's embeddings put
    ``usage`` before the vectors)."""
    usage = read_usage(body[-TAIL_BYTES:])
    if usage is None and len(body) > TAIL_BYTES:
        usage = read_usage(body[:TAIL_BYTES])
    return usage


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
