"""DNS discovery against a real DNS server: Debian's dnsmasq, started by the test on a loopback port, serving
records from a hosts file the test edits (SIGHUP re-reads it). Records added show up as backends; records
removed leave (drained); a resolver that stops answering keeps the last known set, logged once."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from llmbalancer.testing.fake_llama import run_fake_llama
from tests.support import free_port, make_config, run_balancer, wait_for

NAME = "llama.fleet.test"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _dnsmasq() -> str:
    found = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail("dnsmasq is not installed (scripts/test.sh installs Debian's dnsmasq-base)")
    return found


def _free_udp_port() -> int:
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _free_port_on_both_loopbacks() -> int:
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET6) as probe:
            try:
                probe.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on both 127.0.0.1 and ::1")


@contextlib.contextmanager
def running_dnsmasq(tmp_path: Path, hosts: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = _free_udp_port()
    log = (tmp_path / "dnsmasq.log").open("wb")
    process = subprocess.Popen(
        [_dnsmasq(), "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
         "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}", "--local=/fleet.test/", "--cache-size=0",
         "--pid-file=", f"--user={getpass.getuser()}", "--log-facility=-"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        log.close()


def _publish(process: subprocess.Popen[bytes], hosts: Path, addresses: list[str]) -> None:
    hosts.write_text("".join(f"{address} {NAME}\n" for address in addresses))
    process.send_signal(signal.SIGHUP)  # dnsmasq re-reads its hosts files


async def test_addresses_added_and_removed_in_dns_join_and_leave_the_fleet(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 {NAME}\n")
    port = _free_port_on_both_loopbacks()
    with running_dnsmasq(tmp_path, hosts) as (dnsmasq, dns_port):
        config = make_config([], **{
            "discovery.dns": [{"name": NAME, "port": port, "interval": 0.2}],
            "discovery.nameservers": [f"127.0.0.1:{dns_port}"],
        })
        assert config.waits_for_backends  # the default with DNS discovery
        async with (
            run_fake_llama(host="127.0.0.1", port=port) as v4,
            run_fake_llama(host="::1", port=port) as v6,
            run_balancer(config) as balancer,
            aiohttp.ClientSession() as session,
        ):
            registry = balancer.components.registry
            first, second = f"127.0.0.1:{port}", f"[::1]:{port}"
            await wait_for(lambda: (b := registry.get(first)) is not None and b.routable, timeout=10)
            backend = registry.get(first)
            assert backend is not None and backend.source == "dns" and backend.url == f"http://{first}"
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                assert reply.status == 200

            _publish(dnsmasq, hosts, ["127.0.0.1", "::1"])
            await wait_for(lambda: (b := registry.get(second)) is not None and b.routable, timeout=10)
            assert {b.name for b in registry} == {first, second}

            _publish(dnsmasq, hosts, ["::1"])
            await wait_for(lambda: registry.get(first) is None, timeout=10)
            assert [b.name for b in registry] == [second]
            before = v6.state.stats.requests.get("/v1/chat/completions", 0)
            async with session.post(balancer.url + "/v1/chat/completions", json=CHAT) as reply:
                assert reply.status == 200
            assert v6.state.stats.requests.get("/v1/chat/completions", 0) == before + 1
            assert v4.state.stats.requests.get("/v1/chat/completions", 0) == 1

            with capture_logs() as logs:
                dnsmasq.terminate()
                dnsmasq.wait(timeout=5)
                await asyncio.sleep(6 * 0.2 + 4.5)  # several resolutions, each failing after its timeouts
            failures = [e for e in logs if e["event"] == "dns_resolve_failed"]
            assert len(failures) == 1 and failures[0]["kept_backends"] == 1
            assert [b.name for b in registry] == [second]  # the last known set stays
