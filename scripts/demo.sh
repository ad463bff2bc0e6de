#!/usr/bin/env bash
# Quickstart: install everything (idempotent), then run the demo on the embedded stack.
# Arguments go to `sendense demo` (see `.venv/bin/sendense demo --help`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
exec .venv/bin/sendense demo "$@"
