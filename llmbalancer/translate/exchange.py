"""One translated attempt: the backend's request from a ``Plan``, and the relay of its answer in Ollama's shape.

Streams are relayed as they arrive: each read from the backend is split into SSE events, each event
becomes its Ollama object(s), and what one read produced is written at once (one line per token, as
the backend sends one event per token). The idle timeout covers reads and writes as in the proxy: a
backend silent for ``timeouts.idle`` broke the stream; a client that stops reading for that long left.
A stream the backend breaks off, or an error event in it, ends with Ollama's ``{"error": ...}`` line
(the framing stays intact). An error status is answered with the backend's message in Ollama's shape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from llmbalancer.errors import upstream_failed_mid_stream
from llmbalancer.relay.access import Access
from llmbalancer.relay.exchange import Relayed
from llmbalancer.relay.inbound import InboundBody
from llmbalancer.translate.catalog import model_facts, show_answer
from llmbalancer.translate.errors import backend_message, ollama_error
from llmbalancer.translate.replies import BackendAnswerError, OllamaAnswer, line
from llmbalancer.translate.requests import Plan
from llmbalancer.translate.sse import SseOverflow, SseReader

NDJSON = "application/x-ndjson"
MAX_WHOLE_ANSWER = 256 * 1024 * 1024  # embeddings of a large batch; nothing else comes close
MAX_ERROR_ANSWER = 64 * 1024
# Headers of the client's that describe its own body or what it accepts: ours are sent instead. The client's
# Accept-Encoding especially: the translation reads the backend's bytes, which must not come compressed.
_REPLACED = frozenset({"content-type", "accept", "accept-encoding", "content-length"})


class _ClientLeft(Exception):
    """Writing to the client failed or stalled: the client's doing, not the backend's."""

    def __init__(self, code: str, response: web.StreamResponse) -> None:
        super().__init__(code)
        self.code = code
        self.response = response


class OllamaExchange:
    """Implements ``relay.exchange.Exchange`` for one plan."""

    def __init__(
        self, plan: Plan, idle_timeout: float, backend: str, props: Callable[[], Awaitable[Any]] | None = None
    ) -> None:
        self.plan = plan
        self._backend = backend
        self._props = props  # llama.cpp's /props, for /api/show
        self.method = plan.method
        self.path = plan.path
        self.streamed = plan.streamed
        data = orjson.dumps(plan.body) if plan.body is not None else b""
        self.body = InboundBody(data, None, plan.body)
        self._idle = idle_timeout

    def headers(self, forwarded: list[tuple[str, str]]) -> list[tuple[str, str]]:
        headers = [(k, v) for k, v in forwarded if k.lower() not in _REPLACED]
        if self.plan.body is not None:
            headers.append(("Content-Type", "application/json"))
        headers.append(("Accept", "text/event-stream" if self.streamed else "application/json"))
        return headers

    async def relay(self, request: web.Request, upstream: aiohttp.ClientResponse, access: Access) -> Relayed:
        access.status = upstream.status
        try:
            if upstream.status >= 400:
                return await self._error(request, upstream, access)
            answer = OllamaAnswer(self.plan, access.model or "", access.started)
            if self.streamed and upstream.content_type == "text/event-stream":
                return await self._stream(request, upstream, access, answer)
            return await self._whole(request, upstream, access, answer)
        except _ClientLeft as left:
            access.error = left.code
            left.response.force_close()
            if request.transport is not None:
                request.transport.close()  # and the proxy closes the upstream: the backend frees its slot
            return Relayed(left.response, client_left=True)

    async def _read(self, upstream: aiohttp.ClientResponse, limit: int) -> bytes | str:
        """The whole body (bytes), or why it could not be read (str)."""
        try:
            async with asyncio.timeout(self._idle):
                data = await upstream.content.read(limit + 1)
        except TimeoutError:
            return f"no data for {self._idle:g} s"
        except (aiohttp.ClientError, ConnectionResetError) as exc:
            return str(exc) or type(exc).__name__
        return data if len(data) <= limit else f"an answer over {limit} bytes"

    async def _send(self, request: web.Request, access: Access, response: web.Response) -> Relayed:
        access.status = response.status
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError as exc:
            raise _ClientLeft("client_closed", response) from exc
        access.bytes = len(response.body) if isinstance(response.body, bytes) else 0
        return Relayed(response)

    async def _error(self, request: web.Request, upstream: aiohttp.ClientResponse, access: Access) -> Relayed:
        data = await self._read(upstream, MAX_ERROR_ANSWER)
        message = backend_message(data, upstream.status) if isinstance(data, bytes) else f"HTTP {upstream.status}"
        return await self._send(request, access, ollama_error(upstream.status, message, access.request_id))

    async def _whole(
        self, request: web.Request, upstream: aiohttp.ClientResponse, access: Access, answer: OllamaAnswer
    ) -> Relayed:
        data = await self._read(upstream, MAX_WHOLE_ANSWER)
        if isinstance(data, str):
            access.error = "upstream_stream_broken"
            response = ollama_error(502, f"the backend's answer broke off: {data}", access.request_id)
            return (await self._send(request, access, response))._replace(broken=data)
        access.ttfb = time.monotonic()
        try:
            parsed = orjson.loads(data)
            if not isinstance(parsed, Mapping):
                raise BackendAnswerError("the backend's answer is not a JSON object")
            obj = await self._told(answer, parsed)
        except (BackendAnswerError, orjson.JSONDecodeError) as exc:
            access.error = "upstream_bad_answer"
            response = ollama_error(502, f"the backend's answer: {exc}", access.request_id)
            return (await self._send(request, access, response))._replace(broken=str(exc))
        access.usage_tail = answer.usage_tail()
        body = line(obj)
        response = web.Response(
            body=body if self.streamed else body[:-1],
            content_type=NDJSON if self.streamed and self.plan.upstream != "load" else "application/json",
            headers={"X-Request-ID": access.request_id},
        )
        return await self._send(request, access, response)

    async def _told(self, answer: OllamaAnswer, parsed: Mapping[str, Any]) -> dict[str, Any]:
        upstream = self.plan.upstream
        if upstream == "show":
            props = await self._props() if self._props is not None else None
            return self._shown(parsed, props)
        if upstream == "load":
            return answer.loaded()
        if upstream == "embed":
            return answer.embedded(parsed)
        return answer.whole(parsed)

    def _shown(self, models: Mapping[str, Any], props: Any) -> dict[str, Any]:
        listed = model_facts(models, props)
        wanted = self.plan.model
        found = next((f for f in listed if f.name == wanted), listed[0] if len(listed) == 1 else None)
        if found is None:
            raise BackendAnswerError(f"backend {self._backend} does not list model {wanted!r}")
        return show_answer(found, props, self._backend)

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, access: Access, answer: OllamaAnswer
    ) -> Relayed:
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "X-Request-ID": access.request_id})
        try:
            await response.prepare(request)
            broken = await self._pump(upstream, response, access, answer)
            if broken is None:
                tail = [*answer.pending_calls(), answer.final()]
                await self._write(response, access, b"".join(line(obj) for obj in tail))
                access.usage_tail = answer.usage_tail()
            else:
                access.error = "upstream_stream_broken"
                await self._write(response, access, line({"error": upstream_failed_mid_stream(broken).message}))
            await response.write_eof()
        except ConnectionError as exc:
            raise _ClientLeft("client_closed", response) from exc
        except BackendAnswerError as exc:  # tool calls gathered at the end that cannot be told
            access.error = "upstream_bad_answer"
            await self._write(response, access, line({"error": str(exc)}))
            await response.write_eof()
            return Relayed(response, broken=str(exc))
        return Relayed(response, broken=broken)

    async def _write(self, response: web.StreamResponse, access: Access, data: bytes) -> None:
        try:
            await response.write(data)
        except ConnectionError as exc:
            raise _ClientLeft("client_closed", response) from exc
        access.bytes += len(data)

    async def _pump(
        self, upstream: aiohttp.ClientResponse, response: web.StreamResponse, access: Access, answer: OllamaAnswer
    ) -> str | None:
        """Relay the stream's events as Ollama objects; None when the backend finished, else why it broke off."""
        reader = SseReader()
        loop = asyncio.get_running_loop()
        idle = self._idle
        done = writing = False
        try:
            async with asyncio.timeout_at(loop.time() + idle) as deadline:
                while not done:
                    chunk = await upstream.content.readany()
                    events = reader.feed(chunk) if chunk else reader.finish()
                    if not chunk and not events:
                        break
                    if access.ttfb is None:
                        access.ttfb = time.monotonic()
                    objects: list[dict[str, Any]] = []
                    for data in events:
                        if data == b"[DONE]":
                            done = True
                            break
                        event = orjson.loads(data)
                        if isinstance(event, Mapping):
                            objects.extend(answer.event(event))
                    if objects:
                        writing = True
                        await self._write(response, access, b"".join(line(obj) for obj in objects))
                        writing = False
                    deadline.reschedule(loop.time() + idle)
        except TimeoutError:
            if writing:
                raise _ClientLeft("client_stalled", response) from None
            return f"no data for {idle:g} s"
        except (aiohttp.ClientError, ConnectionResetError) as exc:
            return str(exc) or type(exc).__name__
        except (BackendAnswerError, SseOverflow, orjson.JSONDecodeError) as exc:
            return str(exc)
        if not done and answer.finish is None:
            return "the stream ended before the backend said it was done"
        return None
