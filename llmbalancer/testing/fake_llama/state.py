"""What one fake holds across requests and restarts, and the operations on it that both the Python API
(`FakeLlama`) and the HTTP control API (`control`) use: the prepared config, the engine of the running
"process", the test counters, the fault switch.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from llmbalancer.testing.fake_llama.config import RUNTIME_FIELDS, FakeLlamaConfig
from llmbalancer.testing.fake_llama.engine import Engine
from llmbalancer.testing.fake_llama.faults import Fault, FaultSwitch
from llmbalancer.testing.fake_llama.prepared import Prepared
from llmbalancer.testing.fake_llama.stats import Stats


class ServerState:
    """The state of one fake. `prep` is replaced by `update_config` and `engine` at each start; a request
    keeps the ones it started with."""

    def __init__(self, config: FakeLlamaConfig) -> None:
        self.prep = Prepared.build(config)
        self.faults = FaultSwitch()
        self.stats = Stats()
        self.engine = Engine(config, self.stats)
        self.running = False

    @property
    def config(self) -> FakeLlamaConfig:
        return self.prep.config

    def restart_engine(self) -> None:
        """A fresh "process": empty slots, caches and metrics, loading for `load_time` from now."""
        config = self.config
        self.engine = Engine(config, self.stats)
        self.engine.ready_at = time.monotonic() + config.load_time

    def set_fault(self, fault: Fault) -> Fault:
        self.faults.set(fault)
        return fault

    def take_fault(self, path: str) -> Fault | None:
        """The fault that applies to a request to `path` (counted as applied), or None."""
        fault = self.faults.take(path)
        if fault is not None:
            self.stats.faults_applied += 1
        return fault

    def update_config(self, **changes: Any) -> FakeLlamaConfig:
        bad = set(changes) - RUNTIME_FIELDS
        if bad:
            raise ValueError(f"cannot change {', '.join(sorted(bad))} at runtime")
        self.prep = Prepared.build(replace(self.config, **changes))
        return self.config

    def snapshot(self) -> dict[str, Any]:
        """The test counters with the engine's state now (`FakeLlama.stats`, `GET /_fake/stats`)."""
        engine = self.engine
        return self.stats.snapshot(
            processing=engine.busy,
            deferred=len(engine.waiters),
            fault=self.faults.fault.as_dict(),
            running=self.running,
        )
