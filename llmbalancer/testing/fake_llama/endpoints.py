"""llama-server's HTTP endpoints over one fake's state: `/health`, `/slots`, `/metrics`, `/props`,
`/v1/models`, and the generation endpoints (`/v1/chat/completions`, `/completion`, `/v1/completions` and
their aliases). Shapes and status codes: docs/llama-server-api.md.

`legacy_health` mimics llamafile's older server (slot counts in /health, /slots answering 501).
"""

from __future__ import annotations

from aiohttp import web

from llmbalancer.testing.fake_llama.generation import Generation
from llmbalancer.testing.fake_llama.jobs import chat_job, native_job, read_json, text_job
from llmbalancer.testing.fake_llama.state import ServerState
from llmbalancer.testing.fake_llama.tools import requested_call
from llmbalancer.testing.fake_llama.wire import (
    HEALTH_OK_BODY,
    NO_SLOT_BODY,
    NO_SLOTS_ENDPOINT_BODY,
    NOT_FOUND_BODY,
    dumps,
    json_response,
)

# llama.cpp's own endpoints, which a plain OpenAI-compatible server does not have.
LLAMA_ONLY_PATHS: frozenset[str] = frozenset({"/v1/health", "/slots", "/metrics", "/props"})


class LlamaApi:
    """The handlers of llama-server's endpoints; `add_routes` registers them."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/health", self.health)
        router.add_get("/v1/health", self.health)
        router.add_get("/slots", self.slots)
        router.add_get("/metrics", self.metrics)
        router.add_get("/props", self.props)
        router.add_get("/v1/models", self.models)
        router.add_get("/models", self.models)
        router.add_post("/v1/chat/completions", self.chat)
        router.add_post("/chat/completions", self.chat)
        router.add_post("/completion", self.native)
        router.add_post("/completions", self.native)
        router.add_post("/v1/completions", self.text_completion)

    # --- read-only endpoints

    async def health(self, request: web.Request) -> web.StreamResponse:
        if self.state.config.legacy_health:
            engine = self.state.engine
            return json_response(
                dumps({"status": "ok", "slots_idle": len(engine.slots) - engine.busy, "slots_processing": engine.busy})
            )
        return json_response(HEALTH_OK_BODY)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        return json_response(NOT_FOUND_BODY, 404)

    async def slots(self, request: web.Request) -> web.StreamResponse:
        engine = self.state.engine
        if self.state.config.legacy_health:
            return json_response(NO_SLOTS_ENDPOINT_BODY, 501)
        if request.query.get("fail_on_no_slot") not in (None, "", "0", "false") and engine.busy >= len(engine.slots):
            return json_response(NO_SLOT_BODY, 503)
        return json_response(dumps([s.as_json(engine.n_ctx) for s in engine.slots]))

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        engine = self.state.engine
        return web.Response(
            body=engine.metrics_text().encode(),
            headers={
                "Content-Type": "text/plain; version=0.0.4",
                "Process-Start-Time-Unix": str(engine.start_unix),
            },
        )

    async def props(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.state.prep.props_body)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.state.prep.models_body)

    # --- generation endpoints

    async def chat(self, request: web.Request) -> web.StreamResponse:
        data = await read_json(request)
        job = chat_job(data)
        job.tool_call = requested_call(data, self.state.config.tool_arguments)
        return await Generation(request, job, self.state).run()

    async def native(self, request: web.Request) -> web.StreamResponse:
        job = native_job(await read_json(request))
        return await Generation(request, job, self.state).run()

    async def text_completion(self, request: web.Request) -> web.StreamResponse:
        """OpenAI `/v1/completions` (not probed on the real server; shaped like its chat sibling)."""
        job = text_job(await read_json(request))
        return await Generation(request, job, self.state).run()
