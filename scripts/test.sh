#!/usr/bin/env bash
# The test command (README's second command; .ci/run runs exactly this).
# Installs everything from the project's own files, builds or reuses the cached real llama-server,
# then runs the linters and the whole test suite against real servers on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prerequisites.sh
install_system_packages cmake g++ chromium dnsmasq-base redis-server
ensure_venv '.[test]'
.venv/bin/python -m llmbalancer install-llama-server
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python scripts/check_imports.py
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
