"""W8A8 on SmolLM2-135M: SmoothQuant vs naive dynamic int8 vs fp32 (and torch's quantize_dynamic as DATA.md ran it),
perplexity and forward time in the same run, each quantized model measured on the artifact loaded back from disk.

Run: `.venv/bin/python -m bench.w8a8_smollm2` (needs the `bench-llm` extra, see bench/smollm2.py). Writes its section
of docs/benchmarks.md and exits non-zero if SmoothQuant misses its target.
"""

import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from bench.report import machine_description, markdown_table, update_section
from bench.smollm2 import EVAL_TOKENS, EVAL_WINDOW, news_token_ids, smollm2_folder
from core.compression.artifact import load_compressed, save_compressed
from core.compression.metrics import perplexity, weights_size_bytes
from core.compression.modelio import load_model
from core.compression.pipeline import run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext

NAME = "w8a8_smollm2"
COMMAND = f".venv/bin/python -m bench.{NAME}"
THREADS, TIMING_ROUNDS = 2, 5
CALIBRATION = {"num_samples": 16, "seq_len": 256}
RECIPES = {
    "quantize:dynamic (naive W8A8, per-channel)": {"type": "quantize", "method": "dynamic"},
    "quantize:smoothquant alpha 0.75, dynamic": {
        "type": "quantize", "method": "smoothquant", "alpha": 0.75, "calibration": CALIBRATION,
    },
    "quantize:smoothquant alpha 0.5, dynamic": {
        "type": "quantize", "method": "smoothquant", "alpha": 0.5, "calibration": CALIBRATION,
    },
}
TARGET = "quantize:smoothquant alpha 0.75, dynamic"
MAX_PPL_RATIO = 1.2


@dataclass
class Row:
    name: str
    size_bytes: int | None
    ppl: float
    forward_ms: float = 0.0


def main() -> int:
    torch.set_num_threads(THREADS)
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    token_ids = news_token_ids(tokenizer)
    models: list[tuple[str, nn.Module, int | None]] = [("fp32", load_model(folder), weights_size_bytes(folder))]
    models.append(("torch quantize_dynamic per-tensor, all Linear (as DATA.md)", _torch_reference(folder), None))
    with tempfile.TemporaryDirectory(prefix="bench-w8a8-llm-") as tmp:
        for label, step in RECIPES.items():
            artifact = quantize_and_save(folder, tokenizer, step, Path(tmp) / str(len(models)))
            models.append((f"{label} (loaded artifact)", load_compressed(artifact), weights_size_bytes(artifact)))
    rows = [Row(name, size, perplexity(model, token_ids, EVAL_WINDOW)) for name, model, size in models]
    for row, ms in zip(rows, interleaved_forward_ms([m for _, m, _ in models], token_ids), strict=True):
        row.forward_ms = ms
    return publish(rows)


def _torch_reference(folder: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(load_model(folder)), {nn.Linear}, torch.qint8)


def quantize_and_save(folder: Path, tokenizer: object, step: dict, out_dir: Path) -> Path:
    state = ModelState(model=load_model(folder), tokenizer=tokenizer)
    started = time.perf_counter()
    [report] = run_pipeline(state, list(JobSpec.model_validate({"steps": [step]}).steps), StepContext())
    print(f"{step['method']}: {time.perf_counter() - started:.1f} s", json.dumps(report.metrics), report.notes)
    return save_compressed(state, out_dir, {"benchmark": NAME, "steps": [step]}, source_dir=folder)


@torch.no_grad()
def interleaved_forward_ms(models: list[nn.Module], token_ids: torch.Tensor) -> list[float]:
    """Median time of one 1 x 512 forward per model, the models alternating within each round."""
    window = token_ids[:EVAL_WINDOW].unsqueeze(0)
    timings: list[list[float]] = [[] for _ in models]
    for round_index in range(TIMING_ROUNDS + 1):
        for model, times in zip(models, timings, strict=True):
            started = time.perf_counter()
            model(input_ids=window)
            if round_index:  # round 0 warms up
                times.append((time.perf_counter() - started) * 1000)
    return [statistics.median(times) for times in timings]


def publish(rows: list[Row]) -> int:
    fp32 = rows[0]
    target = next(row for row in rows if row.name.startswith(TARGET))
    met = target.ppl <= MAX_PPL_RATIO * fp32.ppl
    body = section(rows, target.ppl / fp32.ppl, met)
    update_section(NAME, body)
    print(body)
    return 0 if met else 1


def section(rows: list[Row], ratio: float, met: bool) -> str:
    headers = ["variant", "weights file MB", "perplexity", "vs fp32", "forward ms (1 x 512)"]
    table = [
        [row.name, "—" if row.size_bytes is None else f"{row.size_bytes / 1e6:.1f}", f"{row.ppl:.2f}",
         f"{row.ppl / rows[0].ppl:.3f}×", f"{row.forward_ms:.0f}"]
        for row in rows
    ]
    verdict = "met" if met else "NOT met"
    return f"""## W8A8 on SmolLM2-135M: SmoothQuant vs naive int8 activations

Reproduce: `{COMMAND}`

Machine: {machine_description()}.

Recipes: `{json.dumps(list(RECIPES.values()))}`

{markdown_table(headers, table)}

Target: SmoothQuant W8A8 perplexity ≤ {MAX_PPL_RATIO}× fp32 (measured {ratio:.3f}×): {verdict}.

- Perplexity: first {EVAL_TOKENS} tokens of gensim's `lee_background.cor`, {EVAL_WINDOW}-token windows
  (`core.compression.metrics.perplexity`). Calibration: {CALIBRATION['num_samples']} x {CALIBRATION['seq_len']} tokens
  of the default corpus (Wikipedia articles; never the evaluation text).
- Our W8A8 steps keep `lm_head` fp32: it is tied to the input embedding (the report of each step says so). torch's
  `quantize_dynamic` quantizes it too and uses 7-bit activations, as in DATA.md's 124.6.
- SmoothQuant folds every scale into the preceding RMSNorm, v_proj (per KV head for grouped-query attention) or
  up_proj, so the int8 model runs no extra op; the forward time is the same int8 GEMM as the naive run.
- Forward: median of {TIMING_ROUNDS} rounds of one 1 x {EVAL_WINDOW} forward, models alternating within each
  round; the machine is shared, so compare within this table only.
"""


if __name__ == "__main__":
    sys.exit(main())
