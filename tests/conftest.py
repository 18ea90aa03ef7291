from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import LlamaServer, real_fleet


@pytest.fixture(scope="session")
def llama_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LlamaServer]]:
    """Two real llama-servers (SmolLM2, -np 2 -t 1), shared by the tests that only read from them."""
    with real_fleet(Path(tmp_path_factory.mktemp("fleet"))) as servers:
        yield servers
