"""OpenAI's Files and Batches API, answered by the balancer itself (``llmbalancer/batches/``):

    POST /v1/files (multipart: file, purpose=batch)    GET /v1/files    GET|DELETE /v1/files/{id}
    GET /v1/files/{id}/content
    POST /v1/batches    GET /v1/batches (limit, after)    GET /v1/batches/{id}    POST /v1/batches/{id}/cancel

An upload streams to disk as it arrives (``batches/files.py``); over ``batch.max_file_bytes`` it is 413,
before a byte is read when its Content-Length says so.

With client keys configured every route needs a key (401), and a key sees only the files and batches it
made (``owner_of``: the key's name; ``batches/api.py``).
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
Owner = Callable[[web.Request], str | None]
_SLACK = 64 * 1024  # multipart framing and the purpose field, around the file itself
_CHUNK = 256 * 1024
_MAX_FIELD = 1024


def add_batch_routes(app: web.Application, api: BatchApi, owner_of: Owner = lambda _: None) -> None:
    """``owner_of``: the client key a request presents (its name), raising 401 without one; None without keys."""
    limit = api.config.max_file_bytes
    router = app.router
    router.add_route("POST", "/v1/files", _upload(api, owner_of), expect_handler=expect_handler(limit + _SLACK))
    router.add_get("/v1/files", _json(lambda r, o: api.list_files(r.query, o), owner_of))
    router.add_get("/v1/files/{file_id}", _json(lambda r, o: _file(api, r.match_info["file_id"], o), owner_of))
    router.add_delete("/v1/files/{file_id}", _json(lambda r, o: api.delete_file(r.match_info["file_id"], o), owner_of))
    router.add_get("/v1/files/{file_id}/content", _content(api, owner_of))
    router.add_post("/v1/batches", _json(lambda r, o: _create(api, r, o), owner_of))
    router.add_get("/v1/batches", _json(lambda r, o: api.list_batches(r.query, o), owner_of))
    router.add_get("/v1/batches/{batch_id}", _json(lambda r, o: api.batch(r.match_info["batch_id"], o), owner_of))
    router.add_post(
        "/v1/batches/{batch_id}/cancel", _json(lambda r, o: api.cancel(r.match_info["batch_id"], o), owner_of)
    )


def _json(answer: Callable[[web.Request, str | None], Awaitable[dict[str, Any]]], owner_of: Owner) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.json_response(await answer(request, owner_of(request)))

    return handle


async def _file(api: BatchApi, file_id: str, owner: str | None) -> dict[str, Any]:
    return (await api.file(file_id, owner)).openai()


async def _create(api: BatchApi, request: web.Request, owner: str | None) -> dict[str, Any]:
    return await api.create(parse_json_object(await request.read()), owner)


def _content(api: BatchApi, owner_of: Owner) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        path = await api.content(request.match_info["file_id"], owner_of(request))
        return web.FileResponse(path, headers={"Content-Type": "application/jsonl"})

    return handle


def _upload(api: BatchApi, owner_of: Owner) -> Handler:
    limit = api.config.max_file_bytes

    async def handle(request: web.Request) -> web.StreamResponse:
        owner = owner_of(request)
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
            return web.json_response(await api.register(*received, purpose, owner))
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
