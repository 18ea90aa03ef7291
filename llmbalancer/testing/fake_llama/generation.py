"""One generation request, from the wait for a slot to the last byte: prefill, decode, the answer.

Generation ends with `finish_reason "stop"` when the reply runs out before the token limit, `"length"`
otherwise (and when the slot's context is full); `ignore_eos` repeats the reply up to the limit. Stream
headers are sent only when the first token exists, as on the real server (docs/llama-server-api.md,
"POST /v1/chat/completions"); a client that goes away frees the slot at once ("Client disconnect").
A mid-stream fault (`faults.fault_points`) aborts the connection or hangs at its token.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from llmbalancer.testing.fake_llama.engine import Slot
from llmbalancer.testing.fake_llama.faults import MID_STREAM_FAULT, fault_points
from llmbalancer.testing.fake_llama.framing import NATIVE_CHUNK, Framing, native_final, usage_json
from llmbalancer.testing.fake_llama.jobs import Job
from llmbalancer.testing.fake_llama.state import ServerState
from llmbalancer.testing.fake_llama.timing import pause, prefill_seconds, timings_json, token_gap
from llmbalancer.testing.fake_llama.wire import SSE_HEADERS, abort, api_error, check_alive, json_response


def plan_length(job: Job, reply_len: int, max_tokens_default: int, room: int) -> tuple[int, str]:
    """How many tokens to generate and the finish reason, given the reply's length and the context left."""
    limit = job.limit if job.limit >= 0 else max_tokens_default
    if job.ignore_eos:
        n_gen, finish = limit, "length"
    elif reply_len < limit:
        n_gen, finish = reply_len, "stop"
    else:
        n_gen, finish = limit, "length"
    if n_gen > room:
        n_gen, finish = room, "length"
    return n_gen, finish


class Generation:
    """Serves one request's `Job` (`await Generation(request, job, state).run()`)."""

    def __init__(self, request: web.Request, job: Job, state: ServerState) -> None:
        self.request = request
        self.job = job
        self.state = state
        self.prep = state.prep  # a request keeps the config and the engine it started with
        self.engine = state.engine
        self.crash_at, self.hang_at = fault_points(MID_STREAM_FAULT.get())
        self.n_prompt = len(job.tokens)
        self.cache_n = self.prompt_n = self.generated = 0
        self.prefilled = self.finished = False
        self.resp: web.StreamResponse | None = None
        self.tool_chunks: list[bytes] = []  # a tool call's chunks, one per token, instead of the reply's
        self.t_start = self.t_first = 0.0

    async def run(self) -> web.StreamResponse:
        """Wait for a slot, "prefill", generate; stream or answer at the end."""
        stats = self.state.stats
        try:
            slot, lcp = await self.engine.acquire(self.job.tokens)
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise
        self.cache_n = self.engine.begin_task(slot, lcp, self.n_prompt, self.job.params, self.job.limit)
        self.prompt_n = self.n_prompt - self.cache_n
        self.t_start = self.t_first = time.perf_counter()
        try:
            return await self._serve(slot)
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise
        except ConnectionError:
            stats.cancelled += 1
            return self._partial()
        finally:
            self._end(slot)

    def _partial(self) -> web.StreamResponse:
        return self.resp if self.resp is not None else web.Response()

    async def _serve(self, slot: Slot) -> web.StreamResponse:
        engine = self.engine
        config = self.prep.config
        n_prompt = self.n_prompt
        if n_prompt >= engine.n_ctx:
            raise api_error(
                400,
                f"request ({n_prompt} tokens) exceeds the available context size ({engine.n_ctx} tokens), "
                "try increasing it",
                "exceed_context_size_error",
                n_prompt_tokens=n_prompt,
                n_ctx=engine.n_ctx,
            )
        await pause(self.request, prefill_seconds(config, self.prompt_n))
        self.t_first = time.perf_counter()
        self.prefilled = True
        engine.on_prompt(self.prompt_n, self.cache_n, self.t_first - self.t_start)

        reply_len = len(self.prep.reply_tokens)
        n_gen, finish = plan_length(self.job, reply_len, config.max_tokens_default, engine.n_ctx - n_prompt)
        usage_null = config.plain_openai and self.job.include_usage
        framing = Framing.build(self.job.kind, int(time.time()), self.prep.alias_json, usage_null=usage_null)
        if self.job.tool_call is not None:
            self.tool_chunks = [framing.delta_chunk(d) for d in self.job.tool_call.stream_deltas()]
            n_gen, finish = len(self.tool_chunks), "tool_calls"
        # after_tokens >= the tokens generated: crash before the finish chunk
        if not await self._decode(slot, n_gen, framing) or self.crash_at >= 0:
            abort(self.request)
            return self._partial()
        if self.hang_at >= n_gen:
            await self.state.faults.hold(self.request)
        return await self._conclude(slot, finish, framing)

    async def _decode(self, slot: Slot, n_gen: int, framing: Framing) -> bool:
        """Generate `n_gen` tokens, streaming each when asked; False when a crash fault's token came."""
        request = self.request
        prep = self.prep
        stream = self.job.stream
        native = self.job.kind == "native"
        pre, post = framing.pre, framing.post
        reply_json, repeat_json = prep.reply_json, prep.repeat_json
        reply_len = len(prep.reply_tokens)
        token_delay, slowdown = prep.config.token_delay, prep.config.batch_slowdown
        crash_at, hang_at = self.crash_at, self.hang_at
        n_prompt = self.n_prompt
        engine = self.engine
        resp = self.resp
        tool_chunks = self.tool_chunks
        for i in range(n_gen):
            if i:
                if token_delay > 0:
                    await pause(request, token_gap(token_delay, slowdown, engine.busy))
                elif resp is not None and i % 64 == 0:
                    await asyncio.sleep(0)  # let others run on a long instant stream
            if i == crash_at:
                return False
            if i == hang_at:
                await self.state.faults.hold(request)
            generated = self.generated = i + 1
            slot.n_decoded = generated
            slot.n_prompt_tokens = n_prompt + generated
            if stream:
                tok = reply_json[i] if i < reply_len else repeat_json[i % reply_len]
                chunk = NATIVE_CHUNK % (tok, 1000 + i % reply_len, generated, n_prompt) if native else pre + tok + post
                if tool_chunks:
                    chunk = tool_chunks[i]
                if resp is None:
                    resp = self.resp = web.StreamResponse(headers=SSE_HEADERS)
                    await resp.prepare(request)
                    chunk = framing.first_extra + chunk
                await resp.write(chunk)
        return True

    async def _conclude(self, slot: Slot, finish: str, framing: Framing) -> web.StreamResponse:
        """The stream's tail, or the whole answer of a request that did not stream."""
        prep = self.prep
        job = self.job
        generated = self.generated
        t_end = time.perf_counter()
        prompt_s, predicted_s = self.t_first - self.t_start, t_end - self.t_first
        timings = timings_json(self.cache_n, self.prompt_n, prompt_s, generated, predicted_s)
        with_timings = b"" if prep.config.plain_openai else b',"timings":' + timings
        usage = usage_json(generated, self.n_prompt, self.cache_n)
        text = prep.text(generated)
        if job.stream:
            resp = self.resp
            if resp is None:
                resp = self.resp = web.StreamResponse(headers=SSE_HEADERS)
                await resp.prepare(self.request)
                tail = framing.first_extra
            else:
                tail = b""
            if job.kind == "native":
                tail += b"data: " + self._native_final(slot, text, finish, timings) + b"\n\n"
            else:
                tail += framing.openai_tail(finish, usage, with_timings, job.include_usage)
            await resp.write(tail)
            await resp.write_eof()
            self.finished = True
            return resp
        if job.kind == "native":
            body = self._native_final(slot, text, finish, timings)
        else:
            message = job.tool_call.message() if job.tool_call is not None else None
            body = framing.openai_body(finish, text, usage, with_timings, message)
        check_alive(self.request)
        self.finished = True
        return json_response(body)

    def _native_final(self, slot: Slot, text: str, finish: str, timings: bytes) -> bytes:
        # The alias as configured now, not as the request started (unlike the OpenAI kinds' `model`).
        return native_final(self.job, text, slot.id, self.state.config.alias, self.generated, finish, timings)

    def _end(self, slot: Slot) -> None:
        """Count the outcome, keep the prompt and reply in the slot's cache, free the slot."""
        if self.finished:
            self.state.stats.completed += 1
        if self.prefilled:  # the slot's KV now holds the prompt and all but the last generated token
            generated = self.generated
            seconds = time.perf_counter() - self.t_first if generated else 0.0
            self.engine.on_prediction(generated, seconds, self.n_prompt + generated)
            slot.cache = self.job.tokens + self.prep.cached_reply(generated)
        self.engine.release(slot)
