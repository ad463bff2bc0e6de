#!/usr/bin/env bash
# Install (idempotent), then run the default test tier, then the slow tier (skip it with SENDENSE_SKIP_SLOW=1).
# Extra arguments go to the default-tier pytest run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install.sh

rc=0
# lint and types first: cheap, and they catch what tests do not (STYLE.md)
.venv/bin/ruff check . || rc=$?
.venv/bin/mypy sendense tools connectors activities workflows workers app || rc=$?
.venv/bin/lint-imports || rc=$?  # the layers of DESIGN.md: pyproject.toml [tool.importlinter]
.venv/bin/pytest "$@" || rc=$?

if [[ "${SENDENSE_SKIP_SLOW:-0}" != "1" ]]; then
  slow=0
  .venv/bin/pytest -m slow || slow=$?
  if ((slow == 5)); then
    echo "test: no slow tests collected"
  elif ((slow != 0)); then
    rc=$slow
  fi
fi

if ((rc != 0)); then
  echo "test: FAILED (exit $rc)" >&2
fi
exit "$rc"
