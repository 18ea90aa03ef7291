"""Helpers for the model-routing tests: fleets of fake Ollamas and configs that declare models."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from llmbalancer.config import Config
from llmbalancer.configure import load_config
from llmbalancer.testing.fake_ollama import FakeOllama, FakeOllamaConfig, run_fake_ollama
from tests.support import free_port


@contextlib.asynccontextmanager
async def fake_ollamas(*models: Sequence[str], token_delay: float = 0.0) -> AsyncIterator[list[FakeOllama]]:
    """One fake Ollama per argument, each serving the models named in it."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                run_fake_ollama(FakeOllamaConfig(models=tuple(names), token_delay=token_delay))
            )
            for names in models
        ]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def config_file(tmp_path: Path, backends: list[dict[str, Any]], **extra: Any) -> Config:
    """A YAML config (the only way to declare per-backend models), with fast health checks."""
    data = {
        "backends": backends,
        "policy": {"name": "round_robin"},
        "health": {"interval": 0.2},
        "logging": {"format": "json"},
        **extra,
    }
    path = tmp_path / "llmbalancer.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(config_file=str(path), environ={})
