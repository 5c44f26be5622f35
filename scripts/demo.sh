#!/usr/bin/env bash
# README command 1: set up, then compress the real all-MiniLM-L6-v2 through the API on the embedded stack
# (SQLite database, SQLite broker, artifacts under ./var) and print the before/after table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/mcs demo "$@"
