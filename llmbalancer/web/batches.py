"""OpenAI's Files and Batches API, answered by the balancer itself (``llmbalancer/batches/``):

    POST /v1/files (multipart: file, purpose=batch)    GET /v1/files    GET|DELETE /v1/files/{id}
    GET /v1/files/{id}/content
    POST /v1/batches    GET /v1/batches (limit, after)    GET /v1/batches/{id}    POST /v1/batches/{id}/cancel

An upload streams to disk as it arrives (``batches/files.py``); over ``batch.max_file_bytes`` it is 413,
before a byte is read when its Content-Length says so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, web

from llmbalancer.batches.api import BatchApi, invalid, too_large
from llmbalancer.batches.records import new_id
from llmbalancer.relay.inbound import parse_json_object
from llmbalancer.web.guard import expect_handler

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_SLACK = 64 * 1024  # multipart framing and the purpose field, around the file itself
_CHUNK = 256 * 1024
_MAX_FIELD = 1024


def add_batch_routes(app: web.Application, api: BatchApi) -> None:
    limit = api.config.max_file_bytes
    router = app.router
    router.add_route("POST", "/v1/files", _upload(api), expect_handler=expect_handler(limit + _SLACK))
    router.add_get("/v1/files", _json(lambda r: api.list_files(r.query)))
    router.add_get("/v1/files/{file_id}", _json(lambda r: _file(api, r.match_info["file_id"])))
    router.add_delete("/v1/files/{file_id}", _json(lambda r: api.delete_file(r.match_info["file_id"])))
    router.add_get("/v1/files/{file_id}/content", _content(api))
    router.add_post("/v1/batches", _json(lambda r: _create(api, r)))
    router.add_get("/v1/batches", _json(lambda r: api.list_batches(r.query)))
    router.add_get("/v1/batches/{batch_id}", _json(lambda r: api.batch(r.match_info["batch_id"])))
    router.add_post("/v1/batches/{batch_id}/cancel", _json(lambda r: api.cancel(r.match_info["batch_id"])))


def _json(answer: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.json_response(await answer(request))

    return handle


async def _file(api: BatchApi, file_id: str) -> dict[str, Any]:
    return (await api.file(file_id)).openai()


async def _create(api: BatchApi, request: web.Request) -> dict[str, Any]:
    return await api.create(parse_json_object(await request.read()))


def _content(api: BatchApi) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        path = await api.content(request.match_info["file_id"])
        return web.FileResponse(path, headers={"Content-Type": "application/jsonl"})

    return handle


def _upload(api: BatchApi) -> Handler:
    limit = api.config.max_file_bytes

    async def handle(request: web.Request) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > limit + _SLACK:
            raise too_large(limit)
        if not request.content_type.startswith("multipart/form-data"):
            raise invalid("Upload a file as multipart/form-data with the fields 'file' and 'purpose'")
        reader = await request.multipart()
        purpose: str | None = None
        received: tuple[str, str, int] | None = None  # file id, name, size
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise invalid("A nested multipart body is not a file upload")
                if part.name == "purpose":
                    purpose = await _field(part)
                    api.check_purpose(purpose)
                elif part.name == "file":
                    if received is not None:
                        raise invalid("Upload one file at a time")
                    file_id = new_id("file-")
                    size = await api.receive(file_id, _chunks(part))
                    received = (file_id, part.filename or "upload.jsonl", size)
                else:
                    await part.release()
            if received is None:
                raise invalid("The upload has no 'file' field")
            return web.json_response(await api.register(*received, purpose))
        except BaseException:
            if received is not None:
                await api.discard(received[0])
            raise

    return handle


async def _field(part: BodyPartReader) -> str:
    data = b""
    while chunk := await part.read_chunk(_MAX_FIELD):
        data += chunk
        if len(data) > _MAX_FIELD:
            raise invalid(f"The field {part.name!r} is longer than {_MAX_FIELD} bytes")
    return data.decode(errors="replace").strip()


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(_CHUNK):
        yield chunk
