"""4-bit-class weight-only quantization of all-MiniLM-L6-v2 side by side: rtn int4 g64 (symmetric, asymmetric),
kmeans 4-bit per row, gptq int4 g64, and mixed 4/8-bit precision, each measured on its artifact loaded back from disk.

Run: `.venv/bin/python -m bench.quant_minilm` (needs the `demo` extra; a few minutes on 2 cores).
Writes its section of docs/benchmarks.md and exits non-zero if a target is missed.
"""

import json
import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from bench.int8_minilm import table
from bench.report import machine_description, markdown_table, update_section
from core.compression.artifact import load_compressed, save_compressed
from core.compression.metrics import weights_size_bytes
from core.compression.modelio import load_model
from core.compression.pipeline import run_pipeline
from core.compression.shipped import LATENCY_BATCH, LATENCY_TOKENS, THREADS, Variant, measure, minilm_folder
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext

NAME = "quant_minilm"
COMMAND = f".venv/bin/python -m bench.{NAME}"
G64 = {"granularity": "per_group", "group_size": 64}
CALIBRATION = {"dataset_id": None, "num_samples": 64, "seq_len": 128}
RECIPES = {
    "rtn int4 g64 symmetric": {"type": "quantize", "bits": 4, **G64},
    "rtn int4 g64 asymmetric": {"type": "quantize", "bits": 4, **G64, "symmetric": False},
    "kmeans 4-bit per row": {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_channel"},
    "gptq int4 g64 asymmetric": {
        "type": "quantize", "method": "gptq", "bits": 4, **G64, "symmetric": False, "calibration": CALIBRATION,
    },
    "mixed 4/8-bit g64 asymmetric, avg 5 bits": {
        "type": "quantize", "method": "mixed", "bits": [4, 8], "budget": {"avg_bits": 5.0}, **G64, "symmetric": False,
    },
}
BEST_CANDIDATES = ("gptq int4 g64 asymmetric", "mixed 4/8-bit g64 asymmetric, avg 5 bits")
MAX_SIZE_RATIO, MIN_COSINE, KMEANS_SIZE_SLACK = 0.17, 0.97, 1.1


def main() -> int:
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    candidates = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        for index, (name, step) in enumerate(RECIPES.items()):
            artifact = quantize_and_save(folder, tokenizer, step, Path(tmp) / str(index))
            candidates.append((name, load_compressed(artifact), weights_size_bytes(artifact)))
    return publish(measure(folder, candidates))


def quantize_and_save(folder: Path, tokenizer, step: dict, out_dir: Path) -> Path:
    state = ModelState(model=load_model(folder), tokenizer=tokenizer)
    [report] = run_pipeline(state, JobSpec(steps=[step]).steps, StepContext())
    print(json.dumps({key: value for key, value in report.metrics.items() if "/" not in key}), flush=True)
    return save_compressed(state, out_dir, {"benchmark": NAME, "steps": [step]}, source_dir=folder)


def checks(variants: list[Variant]) -> dict[str, bool]:
    by_name, base = {v.name: v for v in variants}, variants[0].size_bytes
    best = max((by_name[name] for name in BEST_CANDIDATES), key=lambda v: v.cosine_mean)
    rtn_sym, kmeans = by_name["rtn int4 g64 symmetric"], by_name["kmeans 4-bit per row"]
    return {
        f"best 4-bit-class method ({best.name}): size ≤ {MAX_SIZE_RATIO}× and cosine ≥ {MIN_COSINE}":
            best.size_bytes <= MAX_SIZE_RATIO * base and best.cosine_mean >= MIN_COSINE,
        f"kmeans cosine ≥ rtn int4 g64 symmetric at ≤ {KMEANS_SIZE_SLACK}× its size":
            kmeans.cosine_mean >= rtn_sym.cosine_mean and kmeans.size_bytes <= KMEANS_SIZE_SLACK * rtn_sym.size_bytes,
    }


def publish(variants: list[Variant]) -> int:
    results = checks(variants)
    verdicts = "\n".join(f"- {check}: {'met' if ok else 'NOT met'}" for check, ok in results.items())
    recipes = "\n".join(f"- {name}: `{json.dumps(step)}`" for name, step in RECIPES.items())
    body = f"""## 4-bit-class weight-only quantization of all-MiniLM-L6-v2 (rtn, kmeans, gptq, mixed)

Reproduce: `{COMMAND}`

Machine: {machine_description()}.

{markdown_table(*table(variants))}

{verdicts}

Recipes (every Linear and embedding weight):
{recipes}

- Size: bytes of `*.safetensors`, original folder vs artifact (packed codes + float16 scales / codebooks).
- Cosine: sentence embeddings of the 200 review sentences of gensim's `pang_lee_polarity.cor` vs fp32; mean (min).
- gptq calibrates on {CALIBRATION["num_samples"]} × {CALIBRATION["seq_len"]} tokens of the default corpus (Wikipedia
  articles from gensim's test data); mixed scans sensitivity on 8 × 128 tokens of it. Embeddings and the pooler lie
  outside the transformer blocks, so gptq rounds them to nearest on the same grid.
- Latency: {LATENCY_BATCH} × {LATENCY_TOKENS} tokens, {THREADS} threads, interleaved; weight-only artifacts decode to
  fp32 on load, so latency does not change: these methods save storage and download size.
- Measured on the artifacts loaded back from disk with `core.load_compressed`.
"""
    update_section(NAME, body)
    print(body)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
