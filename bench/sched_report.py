"""The scheduling benchmark's rows, table and verdicts (issue 4's on the mixed fleet at 80 %; issue 15's on the
saturated scenario and the mixed fleet at 80 %, one policy meeting every target in both)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sched_figures import pct

LEGEND = [
    "Columns: **TTFT** from sending a request to its first content token, **e2e** to the stream's end (client "
    "side, seconds); **out tok/s** content tokens received per second of the run; **req/s** requests served per "
    "second of the run (first request sent to last stream ended, drain included); **cache hit** = sum of "
    "`timings.cache_n` / sum of `cache_n + prompt_n` over the streams' finish chunks (prompt tokens the server "
    "did not have to re-read); **errors** non-200, broken or unfinished streams; **misqueued s** seconds "
    "requests spent deferred in one server's FIFO while another server had a free slot, summed over requests "
    "(from the fakes' busy/deferred timelines), **deferred s** all seconds deferred in server FIFOs (llmbalancer "
    "queues in its own admission queue instead, which neither column counts; it shows in TTFT); **slots busy** "
    "share of the fleet's slot-seconds busy over the second half of the arrival window (the first half is "
    "ramp-up), i.e. the load actually carried; **idle while waiting**: share of the fleet's slot-seconds over the "
    "whole run that were idle while a request that could have used them waited (sent by the client and not in a "
    "slot: in the balancer's queue, on its way, or in a server's FIFO; see `bench/sched_figures.py`). Every run "
    "starts a fresh fleet (cold caches). Processes are not pinned: on a small shared machine the figures carry "
    "scheduling noise of tens of milliseconds.",
]


@dataclass
class Row:
    fleet: str
    load: float
    target: str
    requests: int = 0
    errors: int = 0
    ttft_p50: float = float("nan")
    ttft_p99: float = float("nan")
    e2e_p99: float = float("nan")
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    hit_ratio: float = float("nan")
    misqueued_s: float = 0.0
    deferred_s: float = 0.0
    busy_share: float = float("nan")
    idle_waiting: float = float("nan")
    note: str = ""
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        return self.target.startswith("llmbalancer")


def summarize(row: Row, outcomes: Sequence[Any], wall: float) -> None:
    """``outcomes``: ``scheduling.Outcome``s of every seed pooled; ``wall`` their runs' summed wall time."""
    good = [o for o in outcomes if o.ok]
    row.requests = len(outcomes)
    row.errors = len(outcomes) - len(good)
    for o in outcomes:
        if not o.ok:
            row.error_kinds[o.error] = row.error_kinds.get(o.error, 0) + 1
    if good:
        row.ttft_p50 = pct([o.ttft_s for o in good], 0.50)
        row.ttft_p99 = pct([o.ttft_s for o in good], 0.99)
        row.e2e_p99 = pct([o.e2e_s for o in good], 0.99)
        row.tokens_per_s = sum(o.tokens for o in good) / wall
        row.requests_per_s = len(good) / wall
        seen = sum(o.cache_n + o.prompt_n for o in good)
        row.hit_ratio = sum(o.cache_n for o in good) / seen if seen else float("nan")


def _f(value: float, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value != value else f"{value * scale:.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| fleet | load | target | requests | errors | TTFT p50 s | TTFT p99 s | e2e p99 s | out tok/s | req/s "
        "| cache hit | misqueued s | deferred s | slots busy | idle while waiting |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.note:
            lines.append(f"| {r.fleet} | {r.load:.0%} | {r.target} | {r.note} ||||||||||||")
            continue
        errors = str(r.errors) + (f" ({', '.join(f'{k}: {v}' for k, v in r.error_kinds.items())})" if r.errors else "")
        lines.append(
            f"| {r.fleet} | {r.load:.0%} | {r.target} | {r.requests} | {errors} | {_f(r.ttft_p50)} | "
            f"{_f(r.ttft_p99)} | {_f(r.e2e_p99)} | {_f(r.tokens_per_s, digits=0)} | {_f(r.requests_per_s)} | "
            f"{_f(r.hit_ratio, 100, 0)} % | {_f(r.misqueued_s, digits=1)} | {_f(r.deferred_s, digits=1)} | "
            f"{_f(r.busy_share, 100, 0)} % | {_f(r.idle_waiting, 100, 1)} % |"
        )
    return "\n".join(lines)


def verdict(rows: list[Row]) -> list[str]:
    """Issue 4's targets, judged on the mixed fleet at 80 %."""
    at = [r for r in rows if r.fleet == "mixed" and abs(r.load - 0.8) < 1e-9 and not r.note]
    ours = [r for r in at if r.ours]
    theirs = [r for r in at if not r.ours]
    out: list[str] = []
    sglang = next((r for r in theirs if r.target == "sglang-router"), None)
    if ours and theirs and sglang is not None:
        # One policy must meet both: p99 TTFT >= 20 % below the best peer's, cache hits >= sglang-router's.
        peer = min(theirs, key=lambda r: r.ttft_p99)
        met = []
        for row in sorted(ours, key=lambda r: r.ttft_p99):
            gain = 1 - row.ttft_p99 / peer.ttft_p99
            both = gain >= 0.2 and row.hit_ratio >= sglang.hit_ratio
            met += [row.target] if both else []
            out.append(
                f"- {row.target}: p99 TTFT {row.ttft_p99:.2f} s, {gain:.0%} below the best peer's ({peer.target} "
                f"{peer.ttft_p99:.2f} s; target >= 20 %); cache hit {row.hit_ratio:.1%} vs sglang-router "
                f"{sglang.hit_ratio:.1%} (target: at least as high): {'both met' if both else 'not both'}"
            )
        out.append(f"- **verdict: met by {', '.join(met)}**" if met else "- **verdict: MISSED by every policy**")
    errs = [r for r in rows if r.ours and r.errors]
    out.append(
        "- errors: none from any llmbalancer policy at any load" if not errs else
        "- errors from llmbalancer: " + "; ".join(f"{r.target} {r.fleet} {r.load:.0%}: {r.errors}" for r in errs)
    )
    return out


def verdict15(rows: list[Row], oracles: dict[str, float]) -> list[str]:
    """Issue 15's targets, per scenario (the fleet column) that has peers; a policy meets them when it meets
    every target in every such scenario: hit ratio >= sglang-router's and >= 0.75 x the oracle's; TTFT p99
    <= 0.8 x the best peer's; TTFT p50 <= nginx's; requests/s >= nginx's; no errors."""
    out: list[str] = []
    passed: dict[str, bool] = {}
    for scenario in dict.fromkeys(r.fleet for r in rows):
        at = [r for r in rows if r.fleet == scenario and not r.note]
        theirs = {r.target: r for r in at if not r.ours}
        if not {"nginx", "sglang-router"} <= theirs.keys():
            continue
        nginx, sglang = theirs["nginx"], theirs["sglang-router"]
        best = min(theirs.values(), key=lambda r: r.ttft_p99)
        oracle = oracles.get(scenario, float("nan"))
        out.append(
            f"- {scenario}: oracle hit ratio {oracle:.1%}; best peer p99 {best.target} {best.ttft_p99:.2f} s; "
            f"nginx p50 {nginx.ttft_p50:.2f} s, {nginx.requests_per_s:.2f} req/s; sglang-router hit "
            f"{sglang.hit_ratio:.1%}"
        )
        for row in (r for r in at if r.ours):
            checks = {
                "hit >= sglang-router": row.hit_ratio >= sglang.hit_ratio,
                "hit >= 0.75 x oracle": row.hit_ratio >= 0.75 * oracle,
                "p99 <= 0.8 x best peer": row.ttft_p99 <= 0.8 * best.ttft_p99,
                "p50 <= nginx": row.ttft_p50 <= nginx.ttft_p50,
                "req/s >= nginx": row.requests_per_s >= nginx.requests_per_s,
                "no errors": row.errors == 0,
            }
            missed = [name for name, ok in checks.items() if not ok]
            passed[row.target] = passed.get(row.target, True) and not missed
            out.append(
                f"  - {row.target}: hit {row.hit_ratio:.1%} ({row.hit_ratio / oracle:.0%} of oracle), p99 "
                f"{row.ttft_p99:.2f} s ({row.ttft_p99 / best.ttft_p99:.2f} x best peer), p50 {row.ttft_p50:.2f} s, "
                f"{row.requests_per_s:.2f} req/s, {row.errors} errors: "
                + ("all met" if not missed else "missed " + ", ".join(missed))
            )
    if passed:
        met = [target for target, ok in passed.items() if ok]
        out.append(f"- **verdict: met by {', '.join(met)}**" if met else "- **verdict: MISSED by every policy**")
    return out
