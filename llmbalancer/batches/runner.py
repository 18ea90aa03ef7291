"""The batch runner, a service: validates new batches, pours their lines into idle slots, ends them.

One loop (``run``) wakes on any change of the fleet (``Registry.next_change``: a slot freed, the admission
queue moved, a backend joined) or of the batches (created, cancelled, a line recorded, lines loaded),
and at the next expiry. Each time it ends the batches that are done, expires those out of time, and
starts lines while the gate allows (``gate.py``): the highest ``metadata.priority`` first, then the
oldest batch; a batch whose next line finds no slot (its model served elsewhere) lets the next batch try.

A line runs as a task holding a claim (``scheduling/claims.py``) on the backend the policy chose among
those serving its model. Its result is committed to the store before it counts. A backend that fails
before answering (refused, dropped, 5xx, left rotation while the line waited) is charged on the claim
and the line goes back, to be sent to another backend, up to ``batch.max_attempts`` tries.

A batch made with a client key counts its lines against that key's limits (``key_limits.py``).

On cancel no new line starts; the running ones finish, then the batch ends ``cancelled``. On expiry the
running lines are stopped at once and the batch ends ``expired``. When the balancer stops, running lines
are abandoned: they are pending in the store and run again at the next start (``resume``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import aiohttp
import structlog

from llmbalancer.auth.gate import KeyGate
from llmbalancer.auth.keys import ApiKey
from llmbalancer.batches import finalize as ending
from llmbalancer.batches import sender
from llmbalancer.batches.active import LOAD, ActiveBatch, Pending
from llmbalancer.batches.database import Database
from llmbalancer.batches.files import FileSpace
from llmbalancer.batches.gate import BatchGate
from llmbalancer.batches.key_limits import BatchKeys
from llmbalancer.batches.records import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    BatchRecord,
)
from llmbalancer.batches.store import DONE, FAILED, BatchStore, LineResult
from llmbalancer.batches.validating import validate
from llmbalancer.config import Config
from llmbalancer.errors import ProxyError
from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.registry import Registry
from llmbalancer.scheduling.claims import Claim, claim_one
from llmbalancer.scheduling.dispatch import Dispatcher

log = structlog.get_logger("llmbalancer.batches")

RETRY_STATUSES = frozenset({500, 502, 503, 504})
REPLAN_S = 0.5


class BatchRunner:
    name = "batches"

    def __init__(
        self, config: Config, registry: Registry, dispatcher: Dispatcher, keys: KeyGate | None = None
    ) -> None:
        self.config = config.batch
        self.keys = BatchKeys(keys)
        self._timeouts = config.timeouts
        self.db = Database(config.batch.dir)
        self.store = BatchStore(self.db)
        self.files = FileSpace(config.batch.dir, config.batch.max_file_bytes)
        self.gate = BatchGate(config.batch.max_in_flight)
        self._registry = registry
        self._dispatcher = dispatcher
        self.active: dict[str, ActiveBatch] = {}
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._validating: dict[str, asyncio.Task[Any]] = {}
        self._sends: dict[asyncio.Task[Any], Backend] = {}
        self._session: aiohttp.ClientSession | None = None
        self.outcomes: Counter[str] = Counter()  # lines by outcome, for /metrics
        self._paused = False
        self._lines_started = 0  # claims of batch lines: the rest of the fleet's claims are users'
        registry.on_failed.append(self._backend_failed)

    async def open(self) -> None:
        """Start-up: the data directory is usable (``ConfigError`` otherwise); files no record names go."""
        await self.db.open()
        if self.db.exists:
            removed = await asyncio.to_thread(self.files.sweep, await self.store.file_ids())
            if removed:
                log.info("batch_files_swept", files=len(removed))

    def wake(self) -> None:
        self._changed.set()

    def pause(self) -> None:
        """Start no more lines (the balancer is draining)."""
        self._paused = True

    async def run(self) -> None:
        self._session = sender.open_session(self._timeouts)
        try:
            for record in await self.store.active_batches():
                self.adopt(record)
            while True:
                self._step()
                await self._wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._session.close()
            await self.db.close()

    def adopt(self, record: BatchRecord) -> None:
        """Take up a batch: a new one, or one found active at start-up."""
        if record.status == VALIDATING:
            task = self._spawn(self._validate(record))
            self._validating[record.id] = task
            task.add_done_callback(lambda _: self._validating.pop(record.id, None))
            return
        batch = ActiveBatch.of(record)
        if record.status == CANCELLING:
            batch.closing = CANCELLED
        self.active[batch.id] = batch
        if record.status == IN_PROGRESS:
            log.info("batch_running", batch=batch.id, total=batch.total, done=batch.completed + batch.failed)
        self.wake()

    async def cancel(self, batch_id: str) -> BatchRecord | None:
        """Stop starting the batch's lines; it ends ``cancelled`` once its running lines are done."""
        task = self._validating.get(batch_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            now = int(time.time())
            await self.store.delete_lines(batch_id)
            return await self.store.update_batch(
                batch_id, status=CANCELLED, cancelling_at=now, cancelled_at=now, total=0
            )
        batch = self.active.get(batch_id)
        if batch is None or batch.status not in (IN_PROGRESS, VALIDATING):
            return None
        batch.status = CANCELLING
        if batch.closing is None:
            batch.closing = CANCELLED
        self.wake()
        return await self.store.update_batch(batch_id, status=CANCELLING, cancelling_at=int(time.time()))

    # --- the loop -------------------------------------------------------------------------------

    async def _wait(self) -> None:
        self._changed.clear()
        if not self.active:  # nothing to place: the fleet's changes are none of its business
            await self._changed.wait()
            return
        change = self._registry.next_change()
        changed = asyncio.ensure_future(self._changed.wait())
        expiries = [b.expires_at for b in self.active.values() if b.expires_at and b.closing is None]
        timeout = max(0.0, min(expiries) - time.time()) + 0.01 if expiries else None
        if self.gate.demand.rate:  # users' demand fades with time too, not only with changes of the fleet
            timeout = min(timeout or REPLAN_S, REPLAN_S)
        if self.keys.wait is not None:  # a key's minute turns, or one of its lines ends
            timeout = min(timeout or self.keys.wait, self.keys.wait)
        try:
            await asyncio.wait((change, changed), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            change.cancel()
            changed.cancel()

    def _step(self) -> None:
        now = time.time()
        if self.active:
            claims = sum(b.traffic.requests_total for b in self._registry)
            self.gate.plan(time.monotonic(), claims - self._lines_started, len(self._registry.routable()))
        for batch in list(self.active.values()):
            if batch.closing is None and batch.expires_at is not None and now >= batch.expires_at:
                self._expire(batch)
            if batch.idle and not batch.finishing:
                batch.finishing = True
                self._spawn(self._end(batch))
            elif batch.wants_lines():
                batch.loading = True
                self._spawn(self._load(batch))
        if self._paused or self._dispatcher.queue_depth:
            return  # interactive requests are waiting for slots: none goes to batch work
        ready = sorted(
            (b for b in self.active.values() if b.closing is None and b.status in (IN_PROGRESS, FINALIZING)),
            key=lambda b: (-b.priority, b.seq),
        )
        self.keys.wait = None
        while self._start_one(ready):
            pass

    def _start_one(self, ready: list[ActiveBatch]) -> bool:
        for batch in ready:
            if self.keys.held(batch):
                continue
            for pending in (batch.retries[0] if batch.retries else None, batch.loaded[0] if batch.loaded else None):
                if pending is None:
                    continue
                claim = self._claim(batch, pending)
                if claim is None:
                    continue
                batch.take(pending)
                if isinstance(claim, Claim):
                    self._start_line(batch, pending, claim)
                else:  # no backend serves the line's model: that error is its answer
                    batch.running[pending.line.line] = self._spawn(
                        self._settle(batch, pending, _refused(claim, pending.attempts + 1))
                    )
                return True
        return False

    def _claim(self, batch: ActiveBatch, pending: Pending) -> Claim | ProxyError | None:
        facts = pending.facts
        dispatcher = self._dispatcher
        try:
            excluded = dispatcher.routing.exclusion(facts, self._registry, self._failed_on(pending))
        except ProxyError as error:
            return error
        eligible = self.gate.open_to(dispatcher.eligible(excluded))
        return claim_one(self._registry, dispatcher.selector, eligible, facts)

    def _failed_on(self, pending: Pending) -> list[Backend]:
        """The backends this line failed on, unless that leaves it none to go to."""
        failed = [b for b in self._registry if b.name in pending.failed_on]
        if failed and not any(b.routable and b not in failed for b in self._registry):
            return []
        return failed

    def _start_line(self, batch: ActiveBatch, pending: Pending, claim: Claim) -> None:
        self._lines_started += 1
        self.gate.take(claim.backend)
        key = self.keys.key_of(batch)
        self.keys.started(key)
        batch.running[pending.line.line] = self._spawn(self._run_line(batch, pending, claim, key))

    async def _run_line(self, batch: ActiveBatch, pending: Pending, claim: Claim, key: ApiKey | None) -> None:
        backend = claim.backend
        used = 0
        try:
            try:
                await self.keys.counted(key)
                outcome = await self._send(batch, pending, claim)
                if isinstance(outcome, sender.Answered) and outcome.usage is not None:
                    used = (outcome.usage.prompt_tokens or 0) + (outcome.usage.completion_tokens or 0)
            finally:
                claim.release()  # abandoned unless an outcome was recorded on it
                self.gate.give_back(backend)
                await self.keys.ended(key, used)
            result = self._judge(pending, outcome, backend.name)
            if result is None:
                await self.store.count_attempt(pending.line, pending.attempts)
                batch.retries.append(pending)
                self.outcomes["retried"] += 1
                return
            await self._record(batch, pending, result)
        except Exception as exc:  # a bug: the line stays pending in the store, and _end reads it again
            log.error("batch_line_crashed", batch=batch.id, line=pending.line.line, error=repr(exc))
        finally:
            batch.running.pop(pending.line.line, None)
            self.wake()

    async def _send(self, batch: ActiveBatch, pending: Pending, claim: Claim) -> sender.Outcome:
        backend = claim.backend
        assert self._session is not None
        body = pending.encoded(self._dispatcher.routing.rename_for(pending.facts, backend))
        send = asyncio.ensure_future(sender.send(self._session, backend, batch.endpoint, body, pending.line.request_id))
        self._sends[send] = backend
        try:
            await asyncio.wait((send,))
        except asyncio.CancelledError:
            send.cancel()
            raise
        finally:
            self._sends.pop(send, None)
        if send.cancelled():  # its backend left rotation while the line waited for an answer
            outcome: sender.Outcome = sender.NoAnswer(f"{backend.state.value} before it answered", unreachable=True)
        else:
            outcome = send.result()
        if isinstance(outcome, sender.NoAnswer):
            claim.failed(outcome.reason, unreachable=outcome.unreachable)
            return outcome
        self.gate.demand.line_took(outcome.latency)
        if outcome.status in RETRY_STATUSES:
            claim.failed(f"HTTP {outcome.status}")
        else:
            claim.succeeded(outcome.usage, outcome.ttfb, outcome.latency)
        return outcome

    def _judge(self, pending: Pending, outcome: sender.Outcome, backend: str) -> LineResult | None:
        """The line's result, or None to send it again elsewhere."""
        pending.attempts += 1
        attempts = pending.attempts
        failed = isinstance(outcome, sender.NoAnswer) or outcome.status in RETRY_STATUSES
        if failed and attempts < self.config.max_attempts:
            pending.failed_on |= {backend}
            return None
        if isinstance(outcome, sender.NoAnswer):
            message = f"No answer after {attempts} attempt(s); last: {backend}: {outcome.reason}"
            return LineResult(FAILED, attempts, error={"code": "upstream_unreachable", "message": message})
        usage = outcome.usage
        return LineResult(
            DONE if 200 <= outcome.status < 300 else FAILED, attempts, outcome.status,
            outcome.body.decode(errors="replace"),
            prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
            completion_tokens=(usage.completion_tokens or 0) if usage else 0,
            cached_tokens=(usage.cached_tokens or 0) if usage else 0,
        )

    async def _record(self, batch: ActiveBatch, pending: Pending, result: LineResult) -> None:
        if await self.store.record_line(pending.line, result):
            batch.counted(result)
            self.outcomes["completed" if result.state == DONE else "failed"] += 1

    async def _settle(self, batch: ActiveBatch, pending: Pending, result: LineResult) -> None:
        try:
            await self._record(batch, pending, result)
        finally:
            batch.running.pop(pending.line.line, None)
            self.wake()

    def _backend_failed(self, backend: Backend) -> None:
        for send, target in list(self._sends.items()):
            if target is backend:
                send.cancel()

    # --- loading, validating, ending --------------------------------------------------------------

    async def _load(self, batch: ActiveBatch) -> None:
        try:
            batch.add_loaded(await self.store.pending_lines(batch.id, batch.cursor, LOAD))
        finally:
            batch.loading = False
            self.wake()

    async def _validate(self, record: BatchRecord) -> None:
        adopted = await validate(self.store, self.files, record, self.config.max_lines)
        if adopted is not None:
            self.adopt(adopted)

    def _expire(self, batch: ActiveBatch) -> None:
        batch.closing = EXPIRED
        for task in batch.running.values():
            task.cancel()
        log.info("batch_expired", batch=batch.id, done=batch.completed + batch.failed, total=batch.total)

    async def _end(self, batch: ActiveBatch) -> None:
        status = batch.closing or COMPLETED
        try:
            if status == COMPLETED and await self.store.pending_count(batch.id):
                # A line the runner lost track of (a task that died of a bug): read the pending ones again.
                log.error("batch_lines_left_behind", batch=batch.id)
                batch.cursor, batch.exhausted, batch.finishing = 0, False, False
                self.wake()
                return
            if status == COMPLETED and batch.status != FINALIZING:
                batch.status = FINALIZING
                await self.store.update_batch(batch.id, status=FINALIZING, finalizing_at=int(time.time()))
            record, not_run = await self.db.write(lambda c: ending.finalize(c, self.files, batch.id, status))
        except Exception:
            batch.finishing = False  # tried again at the next change
            raise
        self.active.pop(batch.id, None)
        if not_run:
            self.outcomes[status] += not_run
        log.info("batch_ended", batch=batch.id, status=status, completed=record.completed, failed=record.failed)

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(work, name=f"batches.{work.__qualname__}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch_task_failed", task=task.get_name(), error=repr(task.exception()))
            self.wake()

    # --- what the monitor shows -------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        return [b.describe() for b in sorted(self.active.values(), key=lambda b: (-b.priority, b.seq))]


def _refused(error: ProxyError, attempts: int) -> LineResult:
    return LineResult(FAILED, attempts, error.status, error.body().decode())
