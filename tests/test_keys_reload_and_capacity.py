"""The keys file read again on reload (a key removed is refused, one added admitted, a request in flight
finishes); a backend at its rpm offered no more requests this minute; an agent's heartbeat carrying its
server's key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from llmbalancer.fleet.agents import Agents, Heartbeat
from llmbalancer.fleet.registry import Registry
from llmbalancer.reloading import ConfigSource
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_fleet, run_fake_llama
from tests.keys_support import CHAT, TEAM_A, TEAM_B, client, keyed_config
from tests.support import run_balancer


async def test_the_keys_file_is_read_again_on_reload(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"name": "team-a", "key": TEAM_A}]))
    async with run_fake_llama(FakeLlamaConfig(token_delay=0.05)) as fake:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(yaml.safe_dump({
            "backends": [fake.url], "auth": {"keys_file": str(keys_file)}, "health": {"interval": 0.2},
        }))
        source = ConfigSource(config_file=str(config_file), environ={})
        async with run_balancer(source.load(), source) as balancer, client(balancer.url, TEAM_A) as a, \
                client(balancer.url, TEAM_B) as b:
            assert (await a.chat.completions.create(**CHAT)).choices
            with pytest.raises(openai.AuthenticationError):
                await b.chat.completions.create(**CHAT)
            stream = await a.chat.completions.create(**{**CHAT, "max_tokens": 12}, stream=True)
            keys_file.write_text(yaml.safe_dump({"keys": [{"name": "team-b", "key": TEAM_B}]}))
            assert balancer.components.reloader is not None
            result = await balancer.components.reloader.reload()
            assert result.ok and "auth.keys" in result.changed, result
            assert len([c async for c in stream]) > 1  # admitted before the reload: it finishes
            assert (await b.chat.completions.create(**CHAT)).choices
            with pytest.raises(openai.AuthenticationError):
                await a.chat.completions.create(**CHAT)
            keys_file.write_text("- {name: broken}\n")  # a bad file changes nothing
            result = await balancer.components.reloader.reload()
            assert not result.ok and any("auth.keys_file" in p for p in result.problems)
            assert (await b.chat.completions.create(**CHAT)).choices


async def test_a_backend_at_its_rpm_is_offered_no_more_requests_this_minute() -> None:
    left = 60 - time.time() % 60
    if left < 10:
        await asyncio.sleep(left + 0.1)
    async with run_fake_fleet(2) as (quota, free):
        config = keyed_config(
            [{"url": quota.url, "name": "quota", "rpm": 2}, {"url": free.url, "name": "free"}],
            {"name": "team-a", "key": TEAM_A}, **{"policy.name": "round_robin"},
        )
        async with run_balancer(config) as balancer, aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {TEAM_A}"}
            for _ in range(8):
                async with session.post(balancer.url + "/v1/chat/completions", json=CHAT, headers=headers) as reply:
                    assert reply.status == 200
            assert quota.stats["requests"]["/v1/chat/completions"] == 2
            assert free.stats["requests"]["/v1/chat/completions"] == 6
            backend = balancer.components.registry.get("quota")
            assert backend is not None
            assert balancer.components.dispatcher.backend_limits.used(backend)[0] == 2


def test_an_agents_heartbeat_carries_its_servers_key_and_the_backend_is_called_with_it() -> None:
    registry = Registry()
    agents = Agents(registry)
    beat = Heartbeat.model_validate({"url": "http://127.0.0.1:8080", "ready": True, "api_key": "agent-secret"})
    assert "agent-secret" not in repr(beat)
    agents.heartbeat("gpu7", beat)
    backend = registry.get("gpu7")
    assert backend is not None and backend.api_key == "agent-secret"
    assert backend.auth_headers == {"Authorization": "Bearer agent-secret"}
    assert "agent-secret" not in repr(backend)
