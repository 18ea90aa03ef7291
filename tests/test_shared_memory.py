"""What replicas share, without Redis: a policy's memory told as records and learned by another policy of the
same kind (a replica receiving them), the in-memory counters, the ``state`` settings."""

from __future__ import annotations

import pytest

from llmbalancer.config import ConfigError
from llmbalancer.counters import LocalCounters
from llmbalancer.fleet.backend import Backend
from llmbalancer.fleet.usage import Usage
from llmbalancer.scheduling.selectors import Memory, RequestFacts
from llmbalancer.scheduling.selectors.prefix import Prefix
from llmbalancer.scheduling.selectors.slot_aware import SlotAware
from llmbalancer.scheduling.selectors.sticky import Sticky
from llmbalancer.state.fleet_sync import Record
from tests.support import make_config

CHAT = "/v1/chat/completions"


def _facts(text: str, session: str = "s") -> RequestFacts:
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    return RequestFacts("POST", CHAT, "10.0.0.1", {"X-Session-ID": session}, model="m", body=body)


def _backends() -> list[Backend]:
    return [Backend(name, f"http://{name}:1") for name in ("a", "b", "c")]


def test_a_pin_told_by_one_sticky_policy_is_honoured_by_another() -> None:
    told: list[Memory] = []
    here, there = Sticky(SlotAware()), Sticky(SlotAware())
    here.share(told.append)
    a, b, c = _backends()
    here.claimed(c, _facts("hi", "alice"))
    assert [m.kind for m in told] == ["pin"]
    for memory in told:
        there.learn(memory)
    assert there.select([a, b, c], _facts("again", "alice")) is c
    assert there.pinned(_facts("x", "bob")) is None


def test_prefix_placements_and_completions_told_are_learned_alike() -> None:
    told: list[Memory] = []
    here, there = Prefix(block_chars=8, min_match_blocks=2), Prefix(block_chars=8, min_match_blocks=2)
    here.share(told.append)
    a, b, c = _backends()
    prompt = "a long shared prompt that spans many blocks of eight characters each"
    facts = _facts(prompt)
    here.claimed(b, facts)
    here.completed(b, facts, Usage(prompt_tokens=40, cached_tokens=0, prompt_token_seconds=0.001))
    assert [m.kind for m in told] == ["placed", "done"]
    for memory in told:
        there.learn(memory)
    chain = there.chain(_facts(prompt + " and a follow-up"))
    assert there.match(b, chain) == here.match(b, chain) > 0
    assert there.match(a, chain) == 0
    assert there.token_seconds == here.token_seconds == pytest.approx(0.001)
    assert there.select([a, b, c], _facts(prompt + " and a follow-up")) is b


def test_a_memory_of_another_kind_or_malformed_is_ignored() -> None:
    prefix = Prefix()
    prefix.learn(Memory("pin", "a", b"x" * 16))
    prefix.learn(Memory("placed", "a", b"odd"))
    prefix.learn(Memory("done", "a", b"x" * 8, (1.0,)))
    assert not prefix.remembers("a")


def test_local_counters_count_per_fixed_window() -> None:
    now = [1000.0]
    counters = LocalCounters(clock=lambda: now[0])
    assert counters.add("k", 3, 60) == 3
    assert counters.add("k", 2, 60) == 5
    assert counters.read("k", 60) == 5
    now[0] = 1020.0  # 1020 // 60 == 17, 1000 // 60 == 16: the next window
    assert counters.read("k", 60) == 0
    assert counters.add("k", 1, 60) == 1
    assert sorted(t for *_, t in counters.drain()) == [1, 5]
    assert counters.read("k", 60) == 0


def test_local_counters_are_bounded() -> None:
    counters = LocalCounters(max_keys=10)
    for i in range(100):
        counters.add(f"k{i}", 1, 60)
    assert len(counters.drain()) == 10


def test_the_state_url_is_checked_and_its_password_never_printed() -> None:
    config = make_config([], **{"state.url": "redis://:hunter2@10.0.0.2:6379/0"})
    assert config.state.url == "redis://:hunter2@10.0.0.2:6379/0"
    assert config.as_dict()["state"]["url"] == "redis://:***@10.0.0.2:6379/0"
    with pytest.raises(ConfigError, match=r"state\.url"):
        make_config([], **{"state.url": "http://10.0.0.2:6379"})
    with pytest.raises(ConfigError, match="lease"):
        make_config([], **{"state.url": "redis://h", "state.lease": 1.0, "state.heartbeat": 1.0})


def test_the_state_url_comes_from_the_environment_or_the_flag() -> None:
    from llmbalancer.cli import _overrides, _parser
    from llmbalancer.configure import load_config

    config = load_config(environ={"LLMBALANCER_STATE__URL": "redis://10.0.0.2:6379/1"})
    assert config.state.url == "redis://10.0.0.2:6379/1" and config.state.prefix == "llmb"
    args = _parser().parse_args(["serve", "--state", "redis://127.0.0.1:6380/0"])
    assert load_config(environ={}, overrides=_overrides(args)).state.url == "redis://127.0.0.1:6380/0"
    assert load_config(environ={}).state.url is None  # the default: one process, in memory


def test_a_fleet_record_round_trips_and_the_later_one_wins() -> None:
    older = Record("x", "http://h:1", "auto", 2, ("m",), "api", 10.0, "A")
    newer = Record("x", "http://h:2", "auto", None, (), "api", 11.0, "B", gone=True)
    assert Record.parse(older.json()) == older
    assert newer.newer_than(older) and not older.newer_than(newer)
    assert Record("x", "u", "auto", None, (), "api", 10.0, "B").newer_than(older)  # a tie: the replica's name
    assert Record.parse(b"not json") is None
    assert Record.parse(Record("x", "u", "auto", None, (), "dns", 1.0, "A").json()) is None  # not shared
