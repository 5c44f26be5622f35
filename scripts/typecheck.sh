#!/usr/bin/env bash
# mypy (with the pydantic plugin; strict on recipes, the API, the worker and the database, see pyproject.toml),
# filtered through mypy-baseline: an error not in mypy-baseline.txt fails, and so does a baselined error that is gone
# until `bash scripts/typecheck.sh --sync` removes it, so the baseline (torch-heavy code) only ever shrinks.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--sync" ]; then
  { .venv/bin/mypy || true; } | .venv/bin/mypy-baseline sync --baseline-path mypy-baseline.txt --sort-baseline
  exit 0
fi
{ .venv/bin/mypy || true; } | .venv/bin/mypy-baseline filter --baseline-path mypy-baseline.txt --sort-baseline \
  --no-colors --hide-stats
