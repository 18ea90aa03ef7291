"""What client keys cost a request, for ``bench/fairness.py``: paired, keys on against keys off.

- **in process**: the work a keyed request adds, exactly as ``Proxy.forward`` and the lean leg do it (the key
  found by digest from the request's header lines, its model checked, its concurrency, rpm and tpm counted in
  memory, its ``x-ratelimit-*`` headers made and encoded, its facts re-made with the key's name and priority,
  its in-flight place released and its tokens corrected), against the inactive gate's check; CPU time
  (``time.process_time``) over many requests, in interleaved rounds.
- **end to end**: the balancer process's CPU time per request (``/proc``: user + system) under wrk at
  concurrency 16 against an instant backend, keys on (one key with every limit, high enough never to refuse)
  and off, in interleaved rounds; proxy and backend pinned to one core, wrk to another. Noisier: a difference
  of a few microseconds is within its spread, which is reported. A key without limits is measured beside.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import peers
import proxy_overhead

from llmbalancer.auth.gate import KeyGate
from llmbalancer.config.keys import AuthConfig, KeyConfig
from llmbalancer.relay.lean import RawHeaders
from llmbalancer.scheduling.fairness import keyed
from llmbalancer.scheduling.selectors import RequestFacts

KEY = "sk-bench-0123456789abcdef0123456789abcdef"
LIMITED = {"name": "bench", "key": KEY, "rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**6}
# What the OpenAI Python SDK sends with a chat completion.
SDK_HEADERS = [
    (b"Host", b"127.0.0.1:8088"), (b"Accept-Encoding", b"gzip, deflate"), (b"Connection", b"keep-alive"),
    (b"Accept", b"application/json"), (b"Content-Type", b"application/json"), (b"User-Agent", b"OpenAI/Python 1.99"),
    (b"X-Stainless-Lang", b"python"), (b"X-Stainless-Package-Version", b"1.99.0"), (b"X-Stainless-OS", b"Linux"),
    (b"X-Stainless-Arch", b"x64"), (b"X-Stainless-Runtime", b"CPython"), (b"X-Stainless-Retry-Count", b"0"),
    (b"Authorization", b"Bearer " + KEY.encode()), (b"Content-Length", b"120"),
]
BODY = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


@dataclass
class Cost:
    in_process_us: list[float] = field(default_factory=list)  # per request, keys on minus off, each round
    process_on_us: list[float] = field(default_factory=list)  # end to end: CPU µs per request, keys on
    process_off_us: list[float] = field(default_factory=list)
    process_bare_us: list[float] = field(default_factory=list)  # a key without limits
    note: str = ""

    def __post_init__(self) -> None:
        self.by_config = {"limited": self.process_on_us, "off": self.process_off_us, "bare": self.process_bare_us}


CREDENTIALS = (b"Bearer " + KEY.encode(), None)  # as the lean front finds them among the header lines


async def _keys_on(gate: KeyGate, n: int) -> None:
    for _ in range(n):
        headers = RawHeaders(SDK_HEADERS, CREDENTIALS)
        facts = RequestFacts("POST", "/v1/chat/completions", "127.0.0.1", headers, "smollm2", BODY)
        key = gate.authenticate(headers)
        grant = gate.admit_now(key, facts.model, BODY)
        keyed(facts, key.name, key.priority)
        if grant.headers:
            grant.headers.lines()  # as the lean relay writes them
        grant.release(30)


async def _keys_off(gate: KeyGate, n: int) -> None:
    for _ in range(n):
        headers = RawHeaders(SDK_HEADERS, CREDENTIALS)
        RequestFacts("POST", "/v1/chat/completions", "127.0.0.1", headers, "smollm2", BODY)
        if gate.active:
            raise AssertionError("the keys-off gate must be inactive")


def in_process(rounds: int = 7, n: int = 50_000) -> list[float]:
    """µs of CPU per request that keys add, one figure per round (each round: on, then off, same ``n``)."""
    on = KeyGate(AuthConfig(keys=(KeyConfig.model_validate(LIMITED),)))
    off = KeyGate(AuthConfig())
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_keys_on(on, 1000))  # warm: caches, the model judged once
        added = []
        for _ in range(rounds):
            started = time.process_time()
            loop.run_until_complete(_keys_on(on, n))
            middle = time.process_time()
            loop.run_until_complete(_keys_off(off, n))
            ended = time.process_time()
            added.append(((middle - started) - (ended - middle)) / n * 1e6)
        return added
    finally:
        loop.close()


KEYS = {"limited": [LIMITED], "off": [], "bare": [{"name": "bench", "key": KEY}]}


def _config(workdir: Path, backend_port: int, which: str) -> Path:
    path = workdir / f"keys-{which}.yaml"
    config = {"backends": [f"http://127.0.0.1:{backend_port}"], "auth": {"keys": KEYS[which]}}
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def end_to_end(workdir: Path, rounds: int = 5, duration: float = 3.0, proxy_core: int = 1, load_core: int = 0) -> Cost:
    cost = Cost()
    wrk = shutil.which("wrk")
    if wrk is None:
        cost.note = "wrk not installed (apt-get install -y wrk): end-to-end figures not measured"
        return cost
    procs = peers.Processes(workdir)
    try:
        backend = peers.free_port()
        peers.start_python_backend(procs, backend, 10, proxy_core)
        ports: dict[str, tuple[int, int]] = {}
        for which in KEYS:
            port = peers.free_port()
            process = procs.start(
                f"llmbalancer-keys-{which}",
                [sys.executable, "-m", "llmbalancer", "serve", "--config", str(_config(workdir, backend, which)),
                 "--port", str(port), "--log-format", "json"],
                proxy_core,
            )
            body = json.dumps(BODY).encode()
            _wait_post(f"http://127.0.0.1:{port}/v1/chat/completions", process, body)
            ports[which] = (port, process.pid)
        script = workdir / "keyed.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = '{json.dumps(BODY)}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
        )
        for _ in range(rounds):
            for which, (port, group) in ports.items():
                before = peers.group_cpu_seconds(group)
                result = proxy_overhead.run_wrk(wrk, script, port, 16, duration, load_core)
                if result["errors"]:
                    raise RuntimeError(f"keys {which}: {result['errors']} errors under wrk")
                cost.by_config[which].append((peers.group_cpu_seconds(group) - before) / result["requests"] * 1e6)
    finally:
        procs.stop_all()
    return cost


def _wait_post(url: str, process: subprocess.Popen[bytes], body: bytes) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llmbalancer exited with {process.returncode}")
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 in time")


def measure(workdir: Path, end_to_end_rounds: int) -> Cost:
    cost = end_to_end(workdir, end_to_end_rounds) if end_to_end_rounds else Cost(note="end to end: not run")
    cost.in_process_us = in_process()
    return cost


def lines(cost: Cost) -> list[str]:
    out = ["| Per-request cost of keys (CPU µs) | keys off | keys on | added | spread of added | target |",
           "|---|---|---|---|---|---|"]
    added = cost.in_process_us
    out.append(
        f"| in process: the key check and counting (median of {len(added)} paired rounds) | - | - | "
        f"{statistics.median(added):.2f} | {min(added):.2f}-{max(added):.2f} | < 10: "
        f"{'met' if statistics.median(added) < 10 else 'missed'} |"
    )
    off_us = cost.process_off_us
    for label, on_us in (("a key with max_concurrency, rpm and tpm", cost.process_on_us),
                         ("a key without limits", cost.process_bare_us)):
        if not on_us or not off_us:
            continue
        on, off = statistics.median(on_us), statistics.median(off_us)
        pairs = [a - b for a, b in zip(on_us, off_us, strict=True)]
        out.append(
            f"| end to end, {label}: balancer process CPU per request, wrk c16, lean relay (median of "
            f"{len(pairs)} paired rounds) | {off:.1f} | {on:.1f} | {on - off:.1f} | {min(pairs):.1f}-{max(pairs):.1f} "
            f"| < 10: {'met' if on - off < 10 else 'missed'} |"
        )
    if cost.note:
        out.append(f"\n{cost.note}")
    return out


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("PYTHONHASHSEED", "0")
    with tempfile.TemporaryDirectory(prefix="key-cost-") as tmp:
        print("\n".join(lines(measure(Path(tmp), 3))))
