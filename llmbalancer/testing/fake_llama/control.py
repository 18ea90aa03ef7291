"""The fake's own control API, under `/_fake/` (never faulted, never 503, not counted in the stats):

* `GET /_fake/fault`, `POST /_fake/fault {"mode": ..., ...}` (the fields of `faults.Fault`; `paths` may
  be one string), `DELETE /_fake/fault`;
* `GET /_fake/stats`, `DELETE /_fake/stats` (zero the test counters);
* `GET /_fake/config`, `POST /_fake/config {field: value}` (the `config.RUNTIME_FIELDS` only).

A bad request answers 400 with a llama-style error body.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from typing import Any

from aiohttp import web

from llmbalancer.testing.fake_llama.faults import NO_FAULT, Fault
from llmbalancer.testing.fake_llama.state import ServerState
from llmbalancer.testing.fake_llama.wire import api_error, dumps, json_response

CONTROL_PREFIX = "/_fake/"


def _fault_from(data: Any) -> Fault:
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    unknown = set(data) - {f.name for f in fields(Fault)}
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
    paths = data.get("paths")
    if isinstance(paths, str):
        paths = [paths]
    return Fault(
        mode=data.get("mode", "none"),
        after_tokens=data.get("after_tokens"),
        count=data.get("count"),
        status=int(data.get("status", 500)),
        message=str(data.get("message", Fault.message)),
        paths=tuple(paths) if paths is not None else None,
    )


class ControlApi:
    """The handlers of `/_fake/*`; `add_routes` registers them."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/_fake/fault", self.get_fault)
        router.add_post("/_fake/fault", self.set_fault)
        router.add_delete("/_fake/fault", self.clear_fault)
        router.add_get("/_fake/stats", self.stats)
        router.add_delete("/_fake/stats", self.reset_stats)
        router.add_get("/_fake/config", self.get_config)
        router.add_post("/_fake/config", self.set_config)

    def _fault_body(self, remaining: int | None) -> web.Response:
        return json_response(dumps({"fault": self.state.faults.fault.as_dict(), "remaining": remaining}))

    async def get_fault(self, request: web.Request) -> web.StreamResponse:
        return self._fault_body(self.state.faults.left)

    async def set_fault(self, request: web.Request) -> web.StreamResponse:
        try:
            fault = _fault_from(json.loads(await request.read()))
        except (ValueError, TypeError) as exc:
            raise api_error(400, str(exc), "invalid_request_error") from None
        self.state.set_fault(fault)
        return json_response(dumps({"fault": fault.as_dict(), "remaining": self.state.faults.left}))

    async def clear_fault(self, request: web.Request) -> web.StreamResponse:
        self.state.set_fault(NO_FAULT)
        return self._fault_body(None)

    async def stats(self, request: web.Request) -> web.StreamResponse:
        return json_response(dumps(self.state.snapshot()))

    async def reset_stats(self, request: web.Request) -> web.StreamResponse:
        self.state.stats.reset()
        return json_response(dumps(self.state.snapshot()))

    async def get_config(self, request: web.Request) -> web.StreamResponse:
        return json_response(dumps(asdict(self.state.config)))

    async def set_config(self, request: web.Request) -> web.StreamResponse:
        try:
            data = json.loads(await request.read())
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            self.state.update_config(**data)
        except (ValueError, TypeError) as exc:
            raise api_error(400, str(exc), "invalid_request_error") from None
        return json_response(dumps(asdict(self.state.config)))
