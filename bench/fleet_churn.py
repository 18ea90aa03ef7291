"""Fleet churn: a steady stream load while the fleet changes under it.

``--rate`` (50) streamed chat completions per second for ``--duration`` (60) s, open loop, through
``llmbalancer serve`` in front of a simulated fleet (the project's fake llama-server, one process per
server). Every ``--every`` (5) s one backend is removed and another added, by turns through the admin API
(``DELETE`` + ``POST /admin/backends``), through agents (SIGTERM one ``llmbalancer agent``, which
deregisters; start another) and through the configuration file (one backend swapped in ``backends:``);
and every time the configuration is reloaded (``POST /admin/reload``; on the API and agent turns with
``queue.timeout`` toggled).

Figures, from the client and from the balancer's own JSON log:

- failed requests: not 200, or a stream without its ``[DONE]``; should be 0;
- requests sent to a backend after it was drained: request events whose claim (arrival + queue wait)
  came after that backend's ``draining`` state change; should be 0;
- time from a backend's registration (``backend_added``) to its first request's claim, and to healthy.

    python bench/fleet_churn.py                    # ~75 s, prints the figures
    python bench/fleet_churn.py --write-results    # and writes bench/RESULTS.md's fleet-churn section
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import peers
import results
import yaml

TOKEN = "bench-fleet-churn"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "stream": True,
        "max_tokens": 40, "ignore_eos": True}
MECHANISMS = ("api", "agent", "config")


@dataclass
class Member:
    name: str
    mechanism: str
    port: int
    agent: subprocess.Popen[bytes] | None = None


@dataclass
class Run:
    started: int = 0
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)
    reloads_failed: int = 0


class Churn:
    """The fleet as the benchmark changes it: who is registered, by which mechanism, and the idle servers."""

    def __init__(self, procs: peers.Processes, balancer: str, config_path: Path, fakes: list[int]) -> None:
        self.procs = procs
        self.balancer = balancer
        self.config_path = config_path
        self.idle = list(fakes)
        self.members: list[Member] = []
        self.serial = 0
        self.queue_timeout = 30.0

    def name(self, mechanism: str) -> str:
        self.serial += 1
        return f"{mechanism}-{self.serial}"

    def write_config(self) -> None:
        config = {
            "backends": [{"url": f"http://127.0.0.1:{m.port}", "name": m.name}
                         for m in self.members if m.mechanism == "config"],
            "health": {"interval": 0.5},
            "queue": {"timeout": self.queue_timeout},
        }
        self.config_path.write_text(yaml.safe_dump(config))

    async def add(self, session: aiohttp.ClientSession, mechanism: str) -> Member:
        member = Member(self.name(mechanism), mechanism, self.idle.pop(0))
        self.members.append(member)
        url = f"http://127.0.0.1:{member.port}"
        if mechanism == "api":
            async with session.post(self.balancer + "/admin/backends", json={"url": url, "name": member.name},
                                    headers=AUTH) as reply:
                assert reply.status == 201, await reply.text()
        elif mechanism == "agent":
            member.agent = self.procs.start(member.name, [
                sys.executable, "-m", "llmbalancer", "agent", "--local", url, "--balancer", self.balancer,
                "--name", member.name, "--token", TOKEN, "--interval", "0.5", "--log-format", "json"], None)
        else:
            self.write_config()  # applied by the reload that follows
        return member

    async def remove(self, session: aiohttp.ClientSession, mechanism: str) -> Member:
        member = next(m for m in self.members if m.mechanism == mechanism)
        self.members.remove(member)
        if mechanism == "api":
            async with session.delete(self.balancer + f"/admin/backends/{member.name}", headers=AUTH) as reply:
                assert reply.status == 202, await reply.text()
        elif mechanism == "agent":
            assert member.agent is not None
            self.procs.stop(member.agent)  # SIGTERM: the agent deregisters
        else:
            self.write_config()
        asyncio.get_running_loop().call_later(8.0, self.idle.append, member.port)  # reused once long drained
        return member

    async def reload(self, session: aiohttp.ClientSession, run: Run) -> None:
        async with session.post(self.balancer + "/admin/reload", headers=AUTH) as reply:
            if reply.status != 200:
                run.reloads_failed += 1
                print("reload failed:", await reply.text(), file=sys.stderr)


async def one_stream(session: aiohttp.ClientSession, url: str, run: Run) -> None:
    run.started += 1
    try:
        async with session.post(url + "/v1/chat/completions", json=BODY) as reply:
            body = await reply.read()
            if reply.status == 200 and body.rstrip().endswith(b"data: [DONE]"):
                run.ok += 1
                return
            why = f"HTTP {reply.status}" if reply.status != 200 else "stream without [DONE]"
    except (aiohttp.ClientError, TimeoutError) as exc:
        why = type(exc).__name__
    run.failed += 1
    run.errors[why] = run.errors.get(why, 0) + 1


async def drive(churn: Churn, url: str, rate: float, duration: float, every: float) -> Run:
    run = Run()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        streams: set[asyncio.Task[None]] = set()

        async def load() -> None:
            sent = 0
            while (now := loop.time() - start) < duration:
                due = int(now * rate) + 1
                while sent < due:
                    task = asyncio.create_task(one_stream(session, url, run))
                    streams.add(task)
                    task.add_done_callback(streams.discard)
                    sent += 1
                await asyncio.sleep(1 / rate)

        async def change() -> None:
            step = 0
            while (loop.time() - start) + every < duration:
                await asyncio.sleep(start + (step + 1) * every - loop.time())
                mechanism = MECHANISMS[step % len(MECHANISMS)]
                gone = await churn.remove(session, mechanism)
                added = await churn.add(session, mechanism)
                if mechanism != "config":
                    churn.queue_timeout = 31.0 if churn.queue_timeout == 30.0 else 30.0
                    churn.write_config()
                await churn.reload(session, run)
                run.steps.append(f"{mechanism}: -{gone.name} +{added.name}")
                step += 1

        await asyncio.gather(load(), change())
        if streams:
            await asyncio.wait(streams, timeout=60)
    return run


def _time(event: dict[str, Any]) -> float:
    stamp = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    return stamp.timestamp()


def analyse(log_path: Path, run_started: float) -> dict[str, Any]:
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    added: dict[str, float] = {}
    healthy: dict[str, float] = {}
    draining: dict[str, float] = {}
    first_claim: dict[str, float] = {}
    after_drain: list[str] = []
    drained_in_flight = 0  # streams claimed before their backend's drain began and finished after it
    requests = []
    for event in events:
        name, kind = event.get("backend"), event.get("event")
        if kind == "backend_added" and name not in added:
            added[name] = _time(event)
        elif kind == "backend_state_changed" and event.get("new") == "healthy":
            healthy.setdefault(name, _time(event))
        elif kind == "backend_state_changed" and event.get("new") == "draining":
            draining.setdefault(name, _time(event))
        elif kind == "request" and name:
            requests.append(event)
    for event in requests:
        name = event["backend"]
        claimed = _time(event) - event["duration_ms"] / 1000 + (event.get("queue_ms") or 0) / 1000
        first_claim[name] = min(first_claim.get(name, claimed), claimed)
        if name in draining and claimed > draining[name] + 0.001:
            after_drain.append(f"{name} +{(claimed - draining[name]) * 1000:.1f} ms")
        elif name in draining and _time(event) > draining[name]:
            drained_in_flight += 1
    joined = [n for n, t in added.items() if t > run_started]
    to_first = sorted(first_claim[n] - added[n] for n in joined if n in first_claim)
    to_healthy = sorted(healthy[n] - added[n] for n in joined if n in healthy)
    return {"after_drain": after_drain, "joined": len(joined), "to_first": to_first, "to_healthy": to_healthy,
            "drained": len(draining), "retried": sum(1 for e in requests if e.get("attempts", 1) > 1),
            "drained_in_flight": drained_in_flight}


def _ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (f"p50 {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms "
            f"(n={len(values)})")


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fleet-churn-"))
    procs = peers.Processes(workdir)
    port = peers.free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        fakes = {peers.free_port(): index for index in range(args.servers)}
        started = [
            procs.start(f"fake-{index}", [
                sys.executable, "-m", "llmbalancer.testing.fake_llama", "--port", str(fake_port), "--slots", "16",
                "--token-delay", f"{args.token_delay:g}", "--alias", "smollm2"], None)
            for fake_port, index in fakes.items()
        ]
        for fake_port, process in zip(fakes, started, strict=True):
            peers.wait_http(f"http://127.0.0.1:{fake_port}/health", process, 30)
        churn = Churn(procs, url, workdir / "llmbalancer.yaml", list(fakes))
        for mechanism in ("config", "config", "api", "agent"):
            member = Member(churn.name(mechanism), mechanism, churn.idle.pop(0))
            churn.members.append(member)
        churn.write_config()
        # From the environment, as an operator would keep a secret out of the file: reloads keep it.
        os.environ["LLMBALANCER_ADMIN__TOKEN"] = TOKEN
        balancer = procs.start("llmbalancer", [
            sys.executable, "-m", "llmbalancer", "serve", "--config", str(churn.config_path), "--port", str(port),
            "--log-format", "json"], None)
        peers.wait_http(url + "/health", balancer, 30)
        async with aiohttp.ClientSession() as session:
            await _admin_token_note(session, url)
            api = next(m for m in churn.members if m.mechanism == "api")
            async with session.post(url + "/admin/backends", headers=AUTH,
                                    json={"url": f"http://127.0.0.1:{api.port}", "name": api.name}) as reply:
                assert reply.status == 201
            agent = next(m for m in churn.members if m.mechanism == "agent")
            agent.agent = procs.start(agent.name, [
                sys.executable, "-m", "llmbalancer", "agent", "--local", f"http://127.0.0.1:{agent.port}",
                "--balancer", url, "--name", agent.name, "--token", TOKEN, "--interval", "0.5",
                "--log-format", "json"], None)
            for _ in range(100):
                async with session.get(url + "/llmhealth-snapshot") as reply:
                    snapshot = await reply.json()
                if sum(b["routable"] for b in snapshot["backends"]) == 4:
                    break
                await asyncio.sleep(0.1)
        run_started = time.time()
        run = await drive(churn, url, args.rate, args.duration, args.every)
        await asyncio.sleep(1.0)  # the last log lines reach the file
        figures = analyse(workdir / "llmbalancer.log", run_started)
    finally:
        procs.stop_all()
    report(args, run, figures, workdir)
    return 0 if run.failed == 0 and not figures["after_drain"] and run.reloads_failed == 0 else 1


async def _admin_token_note(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(url + "/admin/backends") as reply:
        assert reply.status == 401, "the balancer should require the admin token"


def report(args: argparse.Namespace, run: Run, figures: dict[str, Any], workdir: Path) -> None:
    command = f"python bench/fleet_churn.py --rate {args.rate:g} --duration {args.duration:g} --every {args.every:g}"
    lines = [
        "## Fleet churn",
        "",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {results.machine()}",
        f"- Command: `{command}`",
        f"- Load: {args.rate:g} streams/s (40 tokens each, {args.token_delay * 1000:g} ms per token) for "
        f"{args.duration:g} s; fleet of 4 fake llama-servers (16 slots) out of {args.servers}; every "
        f"{args.every:g} s one backend removed and another added (by turns: admin API, agents, config file) "
        "and the configuration reloaded",
        "",
        "| figure | value |",
        "|---|---|",
        f"| streams sent / completed | {run.started} / {run.ok} |",
        f"| failed requests | {run.failed} {run.errors or ''} |",
        f"| requests sent to a backend after it was drained | {len(figures['after_drain'])} |",
        f"| streams in flight on a backend as it was drained (all finished there) | {figures['drained_in_flight']} |",
        f"| churn steps (remove + add + reload) | {len(run.steps)}, reloads failed: {run.reloads_failed} |",
        f"| backends drained / joined during the run | {figures['drained']} / {figures['joined']} |",
        f"| registration to first request | {_ms(figures['to_first'])} |",
        f"| registration to healthy | {_ms(figures['to_healthy'])} |",
        f"| requests retried on another backend | {figures['retried']} |",
    ]
    text = "\n".join(lines)
    print(text)
    if figures["after_drain"]:
        print("after drain:", figures["after_drain"][:20])
    print(f"logs: {workdir}")
    if args.write_results:
        results.write_section("fleet-churn", text)


def main() -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0, help="streams started per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between fleet changes")
    parser.add_argument("--token-delay", type=float, default=0.02, help="the fakes' seconds per token")
    parser.add_argument("--servers", type=int, default=8, help="fake servers started (4 registered at a time)")
    parser.add_argument("--write-results", action="store_true")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
