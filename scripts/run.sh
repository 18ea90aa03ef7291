#!/usr/bin/env bash
# The main job (README's first command): install, build or reuse the real llama-server, then serve.
# With no arguments it launches the fleet in llamafile_commands.txt (two llama-servers on SmolLM2)
# and answers on http://127.0.0.1:8088; any arguments go to `llmbalancer serve` (e.g. --backend URL).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prerequisites.sh
install_system_packages cmake g++
ensure_venv '.'
.venv/bin/python -m llmbalancer install-llama-server
exec .venv/bin/python -m llmbalancer serve "$@"
