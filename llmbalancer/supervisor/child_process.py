"""Start a supervised server so that it can never outlive the balancer, and stop it in order.

Each child gets its own process group (``start_new_session``), so a stop reaches whatever it forked,
and ``PR_SET_PDEATHSIG(SIGKILL)``, so the kernel kills it if the balancer dies by any means,
SIGKILL included. The death signal fires when the *thread* that forked the child exits: children are
spawned from the event loop's thread, which lives as long as the balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import signal
from collections.abc import Callable, Mapping, Sequence

import structlog

log = structlog.get_logger("llmbalancer.supervisor.instances")

_PR_SET_PDEATHSIG = 1
_PUMP_CHUNK = 64 * 1024


def _die_with_parent(parent: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:  # runs in the child between fork and exec
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died before prctl took effect: then nobody would send the signal.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


async def spawn(
    command: Sequence[str], *, env: Mapping[str, str] | None, cwd: str | None
) -> asyncio.subprocess.Process:
    """Start ``command`` with stdout and stderr on one pipe; OSError (missing binary, ...) propagates."""

    async def start(argv: Sequence[str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )

    try:
        return await start(command)
    except OSError as exc:
        if exc.errno != errno.ENOEXEC:
            raise
        # A llamafile is an Actually Portable Executable: a shell script to the kernel unless APE
        # support is registered, which a shell runs as the original balancer did.
        return await start(["/bin/sh", *command])


def signal_group(process: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


async def terminate(process: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it; returns the exit code."""
    if process.returncode is None:
        signal_group(process, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await process.wait()
        except TimeoutError:
            log.warning("instance_kill_after_grace", pid=process.pid, grace_s=grace)
            signal_group(process, signal.SIGKILL)
    return await process.wait()


async def listening(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port (a local address: answered at once)."""
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def pump(stream: asyncio.StreamReader, write: Callable[[bytes], object]) -> None:
    """Copy a child's output to ``write`` until it closes."""
    while chunk := await stream.read(_PUMP_CHUNK):
        write(chunk)
