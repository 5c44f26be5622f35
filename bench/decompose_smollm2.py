"""Low-rank SmolLM2-135M, each factored Linear keeping 80% of its parameters: plain SVD vs ASVD vs SVD-LLM.

Run: `.venv/bin/python -m bench.decompose_smollm2` (needs the `bench-llm` extra, see bench/smollm2.py).
Writes its section of docs/benchmarks.md and exits non-zero if the target is missed.
"""

import json
import sys
import time
from typing import Any

import torch
from transformers import AutoTokenizer

from bench.prune_smollm2 import THREADS, fp32_model
from bench.report import machine_description, markdown_table, update_section
from bench.smollm2 import EVAL_TOKENS, EVAL_WINDOW, news_token_ids, smollm2_folder
from core.compression.metrics import count_parameters, perplexity
from core.compression.pipeline import run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext

NAME = "decompose_smollm2"
COMMAND = f".venv/bin/python -m bench.{NAME}"
WINDOWS = {"num_samples": 32, "seq_len": 512}
CALIBRATION = {"calibration": WINDOWS}
STEPS: list[dict[str, Any]] = [
    {"type": "decompose", "method": "svd", "params_kept": 0.8},
    {"type": "decompose", "method": "asvd", "params_kept": 0.8, **CALIBRATION},
    {"type": "decompose", "method": "svd_llm", "params_kept": 0.8, **CALIBRATION},
]
MIN_GAIN = 100.0


def run_variant(folder: Any, tokenizer: Any, tokens: torch.Tensor, step: dict[str, Any]) -> list[object]:
    state = ModelState(model=fp32_model(folder), tokenizer=tokenizer)
    start = time.perf_counter()
    [report] = run_pipeline(state, JobSpec.model_validate({"steps": [step]}).steps, StepContext())
    seconds = time.perf_counter() - start
    print(step["method"], json.dumps(report.metrics), flush=True)
    ppl = perplexity(state.model, tokens, EVAL_WINDOW)
    return [step["method"], ppl, count_parameters(state.model), report.metrics["layers_factored"], seconds]


def main() -> int:
    torch.set_num_threads(THREADS)
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokens = news_token_ids(tokenizer)
    base = fp32_model(folder)
    rows = [["fp32", perplexity(base, tokens, EVAL_WINDOW), count_parameters(base), 0, 0.0]]
    del base
    rows += [run_variant(folder, tokenizer, tokens, step) for step in STEPS]
    return publish(rows)


def publish(rows: list[list[Any]]) -> int:
    ppl = {row[0]: row[1] for row in rows}
    gain = ppl["svd"] / ppl["svd_llm"]
    met = gain >= MIN_GAIN
    table = markdown_table(
        ["method", "perplexity", "vs fp32", "parameters", "layers factored", "step seconds"],
        [[r[0], f"{r[1]:.4g}", f"{r[1] / rows[0][1]:.3g}×", f"{r[2]:,}", r[3], f"{r[4]:.0f}"] for r in rows],
    )
    body = f"""## Low-rank SmolLM2-135M: plain SVD vs ASVD vs SVD-LLM at 80% of each layer's parameters

Reproduce: `{COMMAND}`

Machine: {machine_description()}.

{table}

Target: SVD-LLM ≥ {MIN_GAIN:.0f}× lower perplexity than plain SVD in the same run: measured {gain:.3g}×,
{'met' if met else 'NOT met'}.

- Every Linear in the decoder blocks (q, k, v, o, gate, up, down; 210 layers) becomes two Linears whose ranks keep
  80% of its parameters; the tied embedding / LM head is left as is. The whole model keeps
  ~{rows[-1][2] / rows[0][2]:.0%} of its parameters (the embedding is a large share of SmolLM2).
- ASVD and SVD-LLM calibrate on {WINDOWS['num_samples']} × {WINDOWS['seq_len']} tokens of the default corpus
  (Wikipedia articles from gensim's test data), block by block; perplexity is on the first {EVAL_TOKENS} tokens of
  `lee_background.cor` in {EVAL_WINDOW}-token windows. No recovery training: usable quality at this rank needs it.
- Steps: {", ".join(f"`{json.dumps(step)}`" for step in STEPS)}.
"""
    update_section(NAME, body)
    print(body)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
