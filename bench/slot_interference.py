"""Chats that share a system prompt destroy each other's histories on one llama.cpp server.

llama.cpp's ``get_available_slot`` gives a new task the idle slot whose cached prompt shares the longest
prefix with it (similarity > 0.10), and consults the host-RAM prompt cache only when the slot was picked
by LRU or would keep < 50 % of its cached tokens. With ``--cache-idle-slots`` (default on) idle slots are
saved to RAM at each task start. So when more chats than slots take turns, a chat's next turn lands on the
slot of *another* chat with the same system prompt (it keeps >= 50 % through the shared prompt) and its
own history, saved in RAM, is never restored; chats with different system prompts land by LRU and are
restored from RAM.

This script measures it: N chats (default 4) take T turns (default 3) in a seeded shuffled order, one
request at a time, on one 2-slot server, with 1, 2 and 4 distinct system prompts among them (chat i gets
prompt i mod k), 2 repetitions each, a fresh server per run (empty RAM cache). Reuse is
``timings.cache_n / (cache_n + prompt_n)``: for follow-up turns (turn >= 2) and, as a cross-check, for
first turns (only a shared system prompt can be reused there). Both the real llama-server (SmolLM2,
``-np 2 -t 1``) and the project's fake (``llmbalancer.testing.fake_llama``, in-process) are measured.

    python bench/slot_interference.py                  # real and fake, 4 chats; writes its RESULTS.md section
    python bench/slot_interference.py --chats 3,4,6    # more chat counts (the real server takes ~1 min per count)
    python bench/slot_interference.py --fake-only --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import random
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import peers
import results
import workload

sys.path.insert(0, str(peers.ROOT))

from llmbalancer.supervisor.rig import LLAMA_CPP_PYTHON_VERSION, expected_paths  # the repository root, just added
from llmbalancer.testing.fake_llama import FakeLlamaConfig, run_fake_llama
from tests.support import LlamaServer, wait_ready

SECTION = "slot-interference"
CHAT = "/v1/chat/completions"
SLOTS = 2
# 4096 tokens per slot: a system prompt (~150-250 words, up to ~1000 SmolLM2 tokens) and 3+ turns fit.
REAL_CTX = 4096 * SLOTS
SHAPE = workload.Shape(system_prompts=4, system_words=(150, 250))
USER_WORDS = 30
REPLY_TOKENS = 32
PROMPT_COUNTS = (1, 2, 4)
REPETITIONS = 2
REQUEST_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 120.0


@dataclass
class Reuse:
    """Summed prompt tokens of one run: cached (``cache_n``) and prefilled (``prompt_n``)."""

    first_cached: int = 0
    first_prefilled: int = 0
    later_cached: int = 0
    later_prefilled: int = 0

    def add(self, turn: int, cached: int, prefilled: int) -> None:
        if turn == 0:
            self.first_cached += cached
            self.first_prefilled += prefilled
        else:
            self.later_cached += cached
            self.later_prefilled += prefilled

    @property
    def follow_up(self) -> float:
        return self.later_cached / max(1, self.later_cached + self.later_prefilled)

    @property
    def first(self) -> float:
        return self.first_cached / max(1, self.first_cached + self.first_prefilled)


@dataclass
class Row:
    server: str
    chats: int
    prompts: int
    runs: list[Reuse]
    note: str = ""


def user_message(rng: random.Random) -> str:
    return " ".join(f"w{rng.randint(0, 999)}" for _ in range(USER_WORDS))


async def drive(url: str, chats: int, prompts: int, turns: int, seed: int) -> Reuse:
    """The chats take their turns one request at a time, in a shuffled order each round."""
    systems = workload.system_prompts(SHAPE, seed=7)  # the same texts for every run and server
    rng = random.Random(seed)
    histories = [[{"role": "system", "content": systems[i % prompts]}] for i in range(chats)]
    reuse = Reuse()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for turn in range(turns):
            order = list(range(chats))
            rng.shuffle(order)
            for i in order:
                history = histories[i]
                history.append({"role": "user", "content": user_message(rng)})
                body = {"messages": history, "max_tokens": REPLY_TOKENS, "ignore_eos": True, "temperature": 0}
                async with http.post(url + CHAT, json=body) as reply:
                    if reply.status != 200:
                        raise RuntimeError(f"{url}{CHAT} answered {reply.status}: {(await reply.text())[:200]}")
                    data = await reply.json()
                history.append({"role": "assistant", "content": data["choices"][0]["message"]["content"]})
                reuse.add(turn, int(data["timings"]["cache_n"]), int(data["timings"]["prompt_n"]))
    return reuse


def real_command(port: int) -> list[str]:
    paths = expected_paths()
    if not paths.llama_server.exists() or not paths.model.exists():
        raise RuntimeError("llama-server is not installed: run `python -m llmbalancer install-llama-server`")
    return [
        str(paths.llama_server), "-m", str(paths.model), "--host", "127.0.0.1", "--port", str(port),
        "-np", str(SLOTS), "-t", "1", "-c", str(REAL_CTX),
    ]


def start_real(workdir: Path) -> LlamaServer:
    port = peers.free_port()
    log_path = workdir / f"llama-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            real_command(port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return LlamaServer(port, process, log_path)


@contextlib.asynccontextmanager
async def real_server(workdir: Path) -> AsyncIterator[str]:
    server = start_real(workdir)  # nothing else runs on the loop meanwhile
    try:
        await asyncio.to_thread(wait_ready, server.url, READY_TIMEOUT_S)
        yield server.url
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def fake_server(_workdir: Path) -> AsyncIterator[str]:
    # Instant: the fake's defaults for slots, RAM cache and idle-slot saving are llama.cpp's.
    async with run_fake_llama(FakeLlamaConfig(slots=SLOTS, token_delay=0.0, n_ctx=REAL_CTX // SLOTS)) as fake:
        yield fake.url


SERVERS = {"llama-server": real_server, "fake": fake_server}


async def measure(server: str, workdir: Path, chats: int, prompts: int, turns: int, seed: int) -> Row:
    row = Row(server, chats, prompts, [])
    try:
        for rep in range(REPETITIONS):
            # A fresh server per run: the RAM prompt cache starts empty. The repetitions differ in order.
            async with SERVERS[server](workdir) as url:
                row.runs.append(await drive(url, chats, prompts, turns, seed + rep))
    except (RuntimeError, OSError, TimeoutError, aiohttp.ClientError, KeyError, ValueError) as exc:
        row.note = f"not run: {exc}".splitlines()[0][:200]
    return row


def percent(values: list[float]) -> str:
    return " / ".join(f"{v:.0%}" for v in values)


def table(rows: list[Row]) -> str:
    lines = [
        "| server | chats | system prompts | follow-up reuse (runs) | first-turn reuse (runs) |",
        "|---|---:|---:|---|---|",
    ]
    for row in rows:
        follow = percent([r.follow_up for r in row.runs]) or "-"
        first = percent([r.first for r in row.runs]) or "-"
        if row.note:
            follow = f"{follow} ({row.note})"
        lines.append(f"| {row.server} | {row.chats} | {row.prompts} | {follow} | {first} |")
    return "\n".join(lines)


MEANING = [  # one Markdown paragraph, a sentence a line
    "What it means: when more chats than slots take turns on one llama.cpp server, chats that share a system "
    "prompt evict each other's histories: a turn lands by similarity on another chat's slot, keeps >= 50 % of it "
    "through the shared prompt, so its own history, saved in RAM, is never restored.",
    "Chats with different system prompts land by LRU and are restored from RAM.",
    "So a cache-aware router must spread *new* chats of one system prompt over the servers that hold it rather "
    "than pile them on the server that first saw the prompt: that is what `prefix`'s `protect_histories` does "
    "(`llmbalancer/selectors/follow_ups.py`).",
    "The fake follows `get_available_slot` and reproduces the effect (its levels differ: it counts words as "
    "tokens).",
]


def main(argv: list[str] | None = None) -> int:
    peers.stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", default="4", help="comma-separated chat counts (default 4; e.g. 3,4,6)")
    parser.add_argument("--turns", type=int, default=3, help="turns per chat (default 3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fake-only", action="store_true", help="only the fake, not the real llama-server")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    chat_counts = [int(c) for c in args.chats.split(",") if c.strip()]
    if not chat_counts or min(chat_counts) < 1 or args.turns < 2:
        parser.error("--chats must be positive counts and --turns at least 2")
    servers = ["fake"] if args.fake_only else ["llama-server", "fake"]
    started = datetime.datetime.now(datetime.UTC)
    header = results.machine()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="slot-interference-") as tmp:
        for server in servers:
            for chats in chat_counts:
                for prompts in sorted({min(k, chats) for k in PROMPT_COUNTS}):
                    rows.append(asyncio.run(measure(server, Path(tmp), chats, prompts, args.turns, args.seed)))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    command = "python bench/slot_interference.py" + "".join(
        f" {flag}" for flag, on in (
            (f"--chats {args.chats}", args.chats != "4"), (f"--turns {args.turns}", args.turns != 3),
            (f"--seed {args.seed}", args.seed != 1), ("--fake-only", args.fake_only),
        ) if on
    )
    real = (
        f"the real llama-server (llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, SmolLM2-135M, "
        f"`-np {SLOTS} -t 1 -c {REAL_CTX}`, its defaults otherwise: RAM prompt cache and `--cache-idle-slots` on) "
        "and "
    )
    body = "\n".join([
        "## Slot interference: chats sharing a system prompt on one llama.cpp server",
        "",
        f"`{command}` — {started:%Y-%m-%d %H:%M} UTC, {header}. One {SLOTS}-slot server per run, fresh each "
        f"time (empty RAM prompt cache): {'' if args.fake_only else real}the fake (in-process, the same "
        f"defaults). The chats take {args.turns} "
        f"turns each in a shuffled order (seeds {args.seed} and {args.seed + 1}, one run each), one request at a "
        f"time; chat i has system prompt i mod k ({SHAPE.system_words[0]}-{SHAPE.system_words[1]} words), user "
        f"messages of {USER_WORDS} words, replies of {REPLY_TOKENS} tokens. Reuse = sum of `timings.cache_n` / "
        "sum of `cache_n + prompt_n`; follow-up = turns >= 2; first-turn reuse can only come from a shared "
        "system prompt (a cross-check that the prompt was cached).",
        "",
        table(rows),
        "",
        "\n".join(MEANING),
    ])
    results.report(SECTION, body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
