"""Policies as pure functions: candidates and request facts in, one backend out."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

from llmbalancer.config import PolicyConfig
from llmbalancer.fleet.backend import Backend
from llmbalancer.scheduling.selectors import RequestFacts, make_selector
from llmbalancer.scheduling.selectors.hash import Hash
from tests.support import REPO

FLEET = [Backend(name=f"gpu{i}", url=f"http://10.0.0.{i}:8080") for i in range(4)]
KEYS = [f"10.1.{i // 256}.{i % 256}" for i in range(2000)]


def _facts(client: str, headers: dict[str, str] | None = None) -> RequestFacts:
    return RequestFacts(method="POST", path="/v1/chat/completions", client=client, headers=headers or {})


def _assign(selector: Hash, backends: list[Backend]) -> dict[str, str]:
    chosen = {key: selector.select(backends, _facts(key)) for key in KEYS}
    return {key: backend.name for key, backend in chosen.items() if backend is not None}


def test_round_robin_takes_each_backend_in_turn() -> None:
    selector = make_selector(PolicyConfig(name="round_robin"))
    picks = [selector.select(FLEET, _facts("c")) for _ in range(8)]
    assert Counter(b.name for b in picks if b) == {b.name: 2 for b in FLEET}
    assert picks[:4] != picks[1:5]  # no backend twice in a row


def test_hash_maps_the_same_key_to_the_same_backend_in_another_process() -> None:
    here = _assign(Hash(), FLEET)
    script = (
        "import json, sys\n"
        "from llmbalancer.fleet.backend import Backend\n"
        "from llmbalancer.scheduling.selectors.hash import Hash\n"
        "from llmbalancer.scheduling.selectors import RequestFacts\n"
        "fleet = [Backend(name=f'gpu{i}', url='x') for i in range(4)]\n"
        "keys = json.load(sys.stdin)\n"
        "s = Hash()\n"
        "print(json.dumps({k: s.select(fleet, RequestFacts('POST', '/', k)).name for k in keys}))\n"
    )
    # A different PYTHONHASHSEED proves the mapping does not lean on Python's salted hash().
    other = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(KEYS[:200]), capture_output=True, text=True,
        cwd=REPO, env={"PYTHONHASHSEED": "12345", "PATH": ""}, check=True, timeout=30,
    )
    assert json.loads(other.stdout) == {key: here[key] for key in KEYS[:200]}


def test_hash_spreads_keys_over_every_backend() -> None:
    counts = Counter(_assign(Hash(), FLEET).values())
    assert set(counts) == {b.name for b in FLEET}
    # 2000 keys over 4 backends: each near 500; a fair hash stays well inside 350..650.
    assert all(350 < n < 650 for n in counts.values()), counts


def test_hash_moves_only_the_keys_of_a_departed_backend() -> None:
    before = _assign(Hash(), FLEET)
    departed = FLEET[2]
    after = _assign(Hash(), [b for b in FLEET if b is not departed])
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == departed.name}
    assert departed.name not in after.values()


def test_hash_on_a_header_key_falls_back_to_the_client_address() -> None:
    selector = make_selector(PolicyConfig(name="hash", hash_key="header:X-User"))
    by_user = {selector.select(FLEET, _facts(f"10.0.0.{i}", {"X-User": "alice"})) for i in range(50)}
    assert len(by_user) == 1
    without = {selector.select(FLEET, _facts(client)) for client in KEYS[:50]}
    assert len(without) > 1
