"""Keys without a server: the key table, the limits counted by the minute on a given clock, backend capacity,
and the configuration of keys (the keys file, variables, mistakes named by key)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from llmbalancer.auth.gate import estimate_of
from llmbalancer.auth.keys import KeyTable, presented
from llmbalancer.auth.limits import CONCURRENCY, REQUESTS, TOKENS, KeyLimits, LimitHeaders, Refused, Standing
from llmbalancer.config import ConfigError
from llmbalancer.config.keys import KeyConfig
from llmbalancer.configure import load_config
from llmbalancer.counters import LocalCounters
from llmbalancer.fleet.backend import Backend
from llmbalancer.scheduling.backend_limits import BackendLimits


class Clock:
    def __init__(self, now: float = 1_000_040.0) -> None:  # 20 s into a minute
        self.now = now

    def __call__(self) -> float:
        return self.now


def _limits(clock: Clock) -> KeyLimits:
    return KeyLimits(LocalCounters(clock=clock), clock=clock)


def _key(**settings: object) -> KeyTable:
    return KeyTable([KeyConfig.model_validate({"name": "k", "key": "sk-0123456789", **settings})])


def test_keys_are_found_by_digest_from_either_header_and_only_when_enabled() -> None:
    secret = "sk-0123456789"
    table = KeyTable([
        KeyConfig(name="plain", key=secret),  # type: ignore[arg-type]
        KeyConfig(name="hashed", key_sha256=hashlib.sha256(b"sk-hashed-000").hexdigest()),
        KeyConfig(name="off", key="sk-disabled-0", enabled=False),  # type: ignore[arg-type]
    ])
    assert (found := table.find(secret)) is not None and found.name == "plain"
    assert (found := table.find("sk-hashed-000")) is not None and found.name == "hashed"
    assert table.find("sk-disabled-0") is None and table.find("nope") is None and table.find(None) is None
    assert presented({"Authorization": f"Bearer {secret}"}) == secret
    assert presented({"Authorization": "Basic abc", "x-api-key": secret}) == secret
    assert presented({"Authorization": "Bearer "}) is None
    assert secret not in repr(table.find(secret)) and secret not in repr(KeyConfig(name="p", key=secret))  # type: ignore[arg-type]


def test_a_keys_models_are_matched_in_full_and_ollama_latest_is_the_same_model() -> None:
    key = _key(models=["smol.*", "qwen-7b"]).named("k")
    assert key is not None
    assert key.allows("smollm2") and key.allows("qwen-7b") and key.allows(None)
    assert not key.allows("qwen-7b-instruct") and not key.allows("xsmol")
    assert key.allows_listed("qwen-7b:latest") and not key.allows_listed("llama:latest")


async def test_rpm_counts_admitted_requests_per_fixed_minute_and_a_refusal_counts_nothing() -> None:
    clock = Clock()
    limits = _limits(clock)
    key = _key(rpm=2).named("k")
    assert key is not None
    first = await limits.admit(key, 0)
    assert isinstance(first, Standing) and first.requests == 1 and first.reset_s == pytest.approx(40)
    assert dict(LimitHeaders(key, first).pairs())["x-ratelimit-remaining-requests"] == "1"
    assert isinstance(await limits.admit(key, 0), Standing)
    refused = await limits.admit(key, 0)
    assert isinstance(refused, Refused) and refused.limit == REQUESTS and refused.retry_after == pytest.approx(40)
    assert dict(LimitHeaders(key, refused.standing).pairs()) == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "40s",
    }
    assert LimitHeaders(key, refused.standing).lines() == (
        b"x-ratelimit-limit-requests: 2\r\nx-ratelimit-remaining-requests: 0\r\nx-ratelimit-reset-requests: 40s\r\n"
    )
    assert isinstance(await limits.admit(key, 0), Refused)  # still 2 counted, not 4
    clock.now += 40  # the next minute
    assert isinstance(await limits.admit(key, 0), Standing)


async def test_tpm_admits_on_max_tokens_and_is_corrected_to_the_usage_reported() -> None:
    clock = Clock()
    limits = _limits(clock)
    key = _key(tpm=100).named("k")
    assert key is not None
    admitted = await limits.admit(key, 60)
    assert isinstance(admitted, Standing) and admitted.tokens == 60
    refused = await limits.admit(key, 60)  # 60 + 60 > 100 on the estimates
    assert isinstance(refused, Refused) and refused.limit == TOKENS and refused.asked == 60
    await limits.release(key, 60, 25, admitted.window)  # it used 25 (prompt + completion)
    again = await limits.admit(key, 60)
    assert isinstance(again, Standing) and again.tokens == 85
    await limits.release(key, 60, 80, admitted.window)  # used more than its estimate: counted in full
    refused = await limits.admit(key, 0)
    assert isinstance(refused, Refused) and refused.standing.tokens == 105
    await limits.release(key, 60, None, admitted.window)  # nothing known: the estimate stands (no change)
    assert limits.in_flight("k") == 0


async def test_max_concurrency_holds_a_place_per_request_until_it_is_released() -> None:
    clock = Clock()
    limits = _limits(clock)
    key = _key(max_concurrency=2).named("k")
    assert key is not None
    assert isinstance(await limits.admit(key, 0), Standing)
    assert isinstance(await limits.admit(key, 0), Standing)
    refused = await limits.admit(key, 0)
    assert isinstance(refused, Refused) and refused.limit == CONCURRENCY
    await limits.release(key, 0, None, 0)
    assert isinstance(await limits.admit(key, 0), Standing)
    assert limits.in_flight("k") == 2


async def test_batch_lines_are_held_back_while_their_key_is_at_a_limit() -> None:
    clock = Clock()
    limits = _limits(clock)
    key = _key(rpm=2, max_concurrency=5).named("k")
    assert key is not None
    assert limits.wait_for(key) is None
    for _ in range(2):
        limits.line_started(key)
        await limits.count_line(key)
    assert limits.wait_for(key) == pytest.approx(40)
    clock.now += 41
    assert limits.wait_for(key) is None
    await limits.line_ended(key, 10)
    assert limits.in_flight("k") == 1


def test_the_estimate_is_max_tokens_by_any_apis_name() -> None:
    assert estimate_of({"max_tokens": 7}) == 7
    assert estimate_of({"max_completion_tokens": 9}) == 9
    assert estimate_of({"max_output_tokens": 11}) == 11
    assert estimate_of({"options": {"num_predict": 5}}) == 5
    assert estimate_of({"max_tokens": True}) == 0 and estimate_of(None) == 0 and estimate_of({}) == 0


def test_a_backend_at_its_rpm_or_tpm_is_not_offered_requests_until_the_next_minute() -> None:
    clock = Clock()
    woken: list[int] = []
    limits = BackendLimits(lambda: woken.append(1), clock=clock)
    backend = Backend("b", "http://127.0.0.1:1", rpm=2, tpm=1000)
    free = Backend("f", "http://127.0.0.1:2")
    assert limits.allows(backend) and limits.allows(free)
    backend.traffic.requests_total += 2
    assert not limits.allows(backend) and limits.allows(free)
    assert limits.used(backend) == (2, 0)
    clock.now += 40
    assert limits.allows(backend)
    backend.traffic.prompt_tokens_total += 900
    backend.traffic.completion_tokens_total += 100
    assert not limits.allows(backend)


# --- configuration -----------------------------------------------------------------------------------


def test_a_key_needs_exactly_one_secret_and_names_are_unique(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"auth.keys": [
            {"name": "a", "key": "sk-aaaaaaaaaa", "key_env": "X"}, {"name": "b"},
            {"name": "c", "key_sha256": "abc"}, {"name": "d", "key": "sk-dddddddddd", "models": ["("]},
        ]})
    found = [(p.key, p.message) for p in caught.value.problems]
    assert found[0][0] == "auth.keys[0]" and "exactly one of key, key_sha256 or key_env" in found[0][1]
    assert found[1][0] == "auth.keys[1]"
    assert found[2] == ("auth.keys[2].key_sha256", "must be 64 hexadecimal digits (a SHA-256)")
    assert found[3][0] == "auth.keys[3].models" and "not a regular expression" in found[3][1]
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"auth.keys": [
            {"name": "a", "key": "sk-aaaaaaaaaa"}, {"name": "a", "key": "sk-bbbbbbbbbb"},
        ]})
    assert [(p.key, p.message) for p in caught.value.problems] == [("auth.keys[1].name", "duplicate key name 'a'")]


def test_keys_come_from_the_keys_file_and_variables_and_secrets_are_masked(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("- {name: filed, key: sk-from-the-file, rpm: 10}\n- {name: envd, key_env: TEAM_KEY}\n")
    config = load_config(
        environ={"TEAM_KEY": "sk-from-the-env", "GPU_KEY": "backend-secret"},
        overrides={
            "auth.keys": [{"name": "inline", "key": "sk-inline-key"}], "auth.keys_file": str(keys_file),
            "backends": [{"url": "http://127.0.0.1:1", "name": "gpu", "api_key_env": "GPU_KEY", "rpm": 5}],
        },
    )
    assert [k.name for k in config.auth.keys] == ["inline", "filed", "envd"]
    table = KeyTable(config.auth.keys)
    assert table.find("sk-from-the-env") is not None and table.find("sk-from-the-file") is not None
    assert config.backends[0].api_key is not None and config.backends[0].api_key.get_secret_value() == "backend-secret"
    shown = str(config.as_dict())
    for secret in ("sk-inline-key", "backend-secret", "sk-from-the-env", "sk-from-the-file"):
        assert secret not in shown
    keys_file.write_text("- {name: filed, key: sk-from-the-file, rpn: 10}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"auth.keys_file": str(keys_file)})
    assert caught.value.problems[0].key == "auth.keys_file"
    assert "[0].rpn: unknown key" in caught.value.problems[0].message
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"auth.keys": [{"name": "e", "key_env": "UNSET_VAR"}]})
    assert [(p.key, p.message) for p in caught.value.problems] == [
        ("auth.keys[0].key_env", "the variable UNSET_VAR is not set (key 'e')")
    ]


def test_tls_needs_a_certificate_and_a_key_together() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"server.tls_cert": "/x/cert.pem"})
    assert caught.value.problems[0].key == "server"
    assert "tls_cert and tls_key go together" in caught.value.problems[0].message


def test_upstream_keys_come_from_a_server_list_and_a_supervised_command_line(tmp_path: Path) -> None:
    from llmbalancer.config.commands_file import api_key_of

    listed = tmp_path / "server-list.json"
    listed.write_text(
        '{"servers": {"PC1": {"addr": "http://127.0.0.1", "model-port": 8081, "api-key": "pc1-secret"},'
        ' "PC2": {"addr": "http://127.0.0.1", "model-port": 8082, "api-key-env": "PC2_KEY"}}}'
    )
    config = load_config(environ={"PC2_KEY": "pc2-secret"}, overrides={"server_list": str(listed)})
    keys = {b.name: b.api_key.get_secret_value() if b.api_key else None for b in config.backends}
    assert keys == {"PC1": "pc1-secret", "PC2": "pc2-secret"}
    assert api_key_of(("llama-server", "-m", "x.gguf", "--api-key", "k1")) == "k1"
    assert api_key_of(("llama-server", "--api-key=k2")) == "k2"
    assert api_key_of(("llama-server", "--port", "8080")) is None
