"""bench/RESULTS.md: the one place a benchmark's section is (re)written, and the machine line each starts with.

Each benchmark owns one section between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers; a run
replaces only its own section, so sections written by hand around them survive.
"""

from __future__ import annotations

import os
import platform

import peers

RESULTS = peers.HERE / "RESULTS.md"


def machine() -> str:
    load1 = os.getloadavg()[0]
    return f"{platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, " \
           f"Python {platform.python_version()}, load average {load1:.1f} at start"


def write_section(name: str, body: str) -> None:
    """Replace section ``name`` of bench/RESULTS.md with ``body`` (appended at the end the first time)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def report(name: str, body: str, write: bool) -> None:
    """Print a benchmark's section and, when ``write``, put it in bench/RESULTS.md."""
    print("\n" + body)
    if write:
        write_section(name, body)
        print(f"\nwritten to {RESULTS}")
