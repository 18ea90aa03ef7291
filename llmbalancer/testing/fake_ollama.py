"""The fake server's Ollama mode: one fake Ollama serving several models, faithful to Ollama's API.

No real Ollama can be installed here, so this follows Ollama's documented API (docs/api.md) for
what clients use: ``GET /`` (``Ollama is running``), ``/api/version``, ``/api/tags``, ``/api/ps``,
``POST /api/show``, ``/api/chat`` and ``/api/generate`` (NDJSON streams by default; ``"stream":
false`` gives one JSON object), ``/api/embed``, and the OpenAI-compatible ``/v1/models`` and
``/v1/chat/completions``. An unknown model is a 404 ``{"error": "model \\"x\\" not found, try pulling
it first"}``; ``llama3`` names ``llama3:latest``. There is no ``/health`` (a 404, as on Ollama).

It shares fake_llama's machinery (it *is* a ``FakeLlama`` with other routes and the same ``state``): the slots and their
FIFO (``slots`` is ``OLLAMA_NUM_PARALLEL``), the reply and ``token_delay`` pacing, faults (give
``paths``, e.g. ``["/api/chat"]``), load time, the request records of ``stats``. ``served`` counts
the generation requests per model name, as this server saw it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from llmbalancer.testing.fake_llama import FakeLlama, FakeLlamaConfig, tokenize

__all__ = ["FakeOllama", "FakeOllamaConfig", "run_fake_ollama"]

NDJSON = "application/x-ndjson"
_DETAILS = {
    "parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
    "parameter_size": "135M", "quantization_level": "Q8_0",
}


@dataclass(frozen=True)
class FakeOllamaConfig:
    models: tuple[str, ...] = ("smollm2:latest",)
    version: str = "0.6.2"
    slots: int = 4
    token_delay: float = 0.0
    reply: str = "Hello from the fake Ollama."
    max_tokens_default: int = 16
    load_time: float = 0.0
    # The models /api/ps shows as loaded now (None: all of them); any model is loaded on demand.
    loaded: tuple[str, ...] | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class FakeOllama(FakeLlama):
    def __init__(self, config: FakeOllamaConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.ollama = config or FakeOllamaConfig()
        llama = FakeLlamaConfig(
            slots=self.ollama.slots, alias=self.ollama.models[0], token_delay=self.ollama.token_delay,
            reply=self.ollama.reply, max_tokens_default=self.ollama.max_tokens_default,
            load_time=self.ollama.load_time,
        )
        super().__init__(llama, host=host, port=port)
        self.served: Counter[str] = Counter()

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_get("/", self._root)  # HEAD too: the ollama CLI's heartbeat
        r.add_get("/api/version", self._version)
        r.add_get("/api/tags", self._tags)
        r.add_get("/api/ps", self._ps)
        r.add_post("/api/show", self._show)
        r.add_post("/api/chat", self._chat_ollama)
        r.add_post("/api/generate", self._generate)
        r.add_post("/api/embed", self._embed)
        r.add_get("/v1/models", self._openai_models)
        r.add_post("/v1/chat/completions", self._openai_chat)
        c = self.control
        for method, path, handler in (
            ("GET", "/_fake/fault", c.get_fault), ("POST", "/_fake/fault", c.set_fault),
            ("DELETE", "/_fake/fault", c.clear_fault), ("GET", "/_fake/stats", c.stats),
            ("DELETE", "/_fake/stats", c.reset_stats),
        ):
            r.add_route(method, path, handler)
        r.add_route("*", "/{tail:.*}", self._page_not_found)
        return app

    # --- the model catalogue

    def _resolve(self, name: Any) -> str | None:
        if not isinstance(name, str):
            return None
        for model in self.ollama.models:
            if name in (model, model.removesuffix(":latest")):
                return model
        return None

    @staticmethod
    def _missing(name: Any) -> web.Response:
        return web.json_response({"error": f'model "{name}" not found, try pulling it first'}, status=404)

    def _entry(self, model: str) -> dict[str, Any]:
        return {
            "name": model, "model": model, "modified_at": "2025-01-01T00:00:00Z", "size": 270_898_672,
            "digest": _digest(model), "details": _DETAILS,
        }

    async def _root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def _page_not_found(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="404 page not found")

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": self.ollama.version})

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"models": [self._entry(m) for m in self.ollama.models]})

    async def _ps(self, request: web.Request) -> web.StreamResponse:
        loaded = [
            {**self._entry(m), "expires_at": "2099-01-01T00:00:00Z", "size_vram": 270_898_672, "context_length": 4096}
            for m in self.ollama.models
            if self.ollama.loaded is None or m in self.ollama.loaded
        ]
        for entry in loaded:
            entry.pop("modified_at")
        return web.json_response({"models": loaded})

    async def _show(self, request: web.Request) -> web.StreamResponse:
        data = await self._body(request)
        name = data.get("model", data.get("name"))
        model = self._resolve(name)
        if model is None:
            return self._missing(name)
        return web.json_response(
            {
                "license": "Apache 2.0", "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {model}\n",
                "parameters": 'stop "<|im_end|>"', "template": "{{ .Prompt }}", "details": _DETAILS,
                "model_info": {"general.architecture": "llama", "general.name": model, "llama.context_length": 8192},
                "capabilities": ["completion"], "modified_at": "2025-01-01T00:00:00Z",
            }
        )

    async def _openai_models(self, request: web.Request) -> web.StreamResponse:
        data = [{"id": m, "object": "model", "created": 1735689600, "owned_by": "library"} for m in self.ollama.models]
        return web.json_response({"object": "list", "data": data})

    # --- generation

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.read())
        except ValueError:
            raise web.HTTPBadRequest(text='{"error":"invalid JSON"}', content_type="application/json") from None
        return data if isinstance(data, dict) else {}

    def _ollama_limit(self, data: Mapping[str, Any], *keys: str) -> int:
        for source in (data.get("options") or {}, data):
            for key in keys:
                value = source.get(key) if isinstance(source, Mapping) else None
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    return value
        return self.config.max_tokens_default

    async def _tokens(self, prompt: str, limit: int) -> AsyncIterator[str]:
        """The reply's tokens, paced by ``token_delay``, while holding one slot."""
        engine = self.state.engine
        slot, _ = await engine.acquire(tuple(tokenize(prompt)))
        try:
            for token in self.state.prep.reply_tokens[:limit]:
                if self.config.token_delay:
                    await asyncio.sleep(self.config.token_delay)
                yield token
            self.state.stats.completed += 1
        except (asyncio.CancelledError, ConnectionError):
            self.state.stats.cancelled += 1
            raise
        finally:
            engine.release(slot)

    async def _ollama_generation(self, request: web.Request, key: str) -> web.StreamResponse:
        data = await self._body(request)
        model = self._resolve(data.get("model"))
        if model is None:
            return self._missing(data.get("model"))
        self.served[data["model"]] += 1
        prompt = json.dumps(data.get("messages")) if key == "message" else str(data.get("prompt", ""))
        limit = self._ollama_limit(data, "num_predict")

        def piece(text: str) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": text}} if key == "message" else {"response": text}

        started = time.monotonic_ns()
        final = {"done": True, "done_reason": "stop", "total_duration": 0, "load_duration": 1000,
                 "prompt_eval_count": len(tokenize(prompt)), "prompt_eval_duration": 1000, "eval_count": 0,
                 "eval_duration": 0}
        if key == "response":
            final["context"] = [1, 2, 3]
        if data.get("stream", True) is False:
            text = "".join([t async for t in self._tokens(prompt, limit)])
            final.update(eval_count=len(tokenize(text)), total_duration=time.monotonic_ns() - started)
            return web.json_response({"model": data["model"], "created_at": _now(), **piece(text), **final})
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        count = 0
        async for token in self._tokens(prompt, limit):
            if not response.prepared:
                await response.prepare(request)
            chunk = {"model": data["model"], "created_at": _now(), **piece(token), "done": False}
            await response.write(json.dumps(chunk).encode() + b"\n")
            count += 1
        if not response.prepared:
            await response.prepare(request)
        final.update(eval_count=count, total_duration=time.monotonic_ns() - started)
        await response.write(json.dumps({"model": data["model"], "created_at": _now(), **piece(""), **final}).encode()
                             + b"\n")
        await response.write_eof()
        return response

    async def _chat_ollama(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama_generation(request, "message")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama_generation(request, "response")

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        data = await self._body(request)
        model = self._resolve(data.get("model"))
        if model is None:
            return self._missing(data.get("model"))
        self.served[data["model"]] += 1
        inputs = data.get("input")
        count = len(inputs) if isinstance(inputs, list) else 1
        return web.json_response(
            {"model": data["model"], "embeddings": [[0.1, -0.2, 0.3]] * count, "total_duration": 1000,
             "load_duration": 100, "prompt_eval_count": count}
        )

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        data = await self._body(request)
        name = data.get("model")
        if self._resolve(name) is None:
            error = {"message": f'model "{name}" not found, try pulling it first', "type": "api_error",
                     "param": None, "code": None}
            return web.json_response({"error": error}, status=404)
        self.served[str(name)] += 1
        prompt = json.dumps(data.get("messages"))
        limit = self._ollama_limit(data, "max_completion_tokens", "max_tokens")
        ident, created = f"chatcmpl-{secrets.randbelow(1000)}", int(time.time())
        base = {"id": ident, "created": created, "model": name, "system_fingerprint": "fp_ollama"}
        if not data.get("stream"):
            text = "".join([t async for t in self._tokens(prompt, limit)])
            n = len(tokenize(text))
            return web.json_response({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n},
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})

        def event(delta: dict[str, Any], finish: str | None) -> bytes:
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        async for token in self._tokens(prompt, limit):
            if not response.prepared:
                await response.prepare(request)
            await response.write(event({"role": "assistant", "content": token}, None))
        if not response.prepared:
            await response.prepare(request)
        await response.write(event({"role": "assistant", "content": ""}, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def run_fake_ollama(
    config: FakeOllamaConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[FakeOllama]:
    """Serve one fake Ollama on ``host`` (a free port unless given) for the duration of the block."""
    fake = FakeOllama(config, host=host, port=port)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
