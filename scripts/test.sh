#!/usr/bin/env bash
# README command 2: the whole suite (lint, import boundaries, type check, tests) against real PostgreSQL and Redis on
# 127.0.0.1 and real worker processes. Starts PostgreSQL and Redis when they are not running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The tests use tiny models: one thread each avoids OpenMP oversubscription across the worker processes they start.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The browser test must run, not skip, wherever the suite runs: setup.sh installs chromium.
export MCS_TEST_REQUIRE_BROWSER="${MCS_TEST_REQUIRE_BROWSER:-1}"
.venv/bin/ruff check .
.venv/bin/lint-imports
bash scripts/typecheck.sh
exec .venv/bin/pytest "$@"
