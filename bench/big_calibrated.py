"""Issue 17, the calibrated steps on big models: gptq, sparsegpt and SmoothQuant W8A8 with one decoder block in
memory at a time (`core/compression/offload.py`), and the offloaded engine against the in-memory one on the real
SmolLM2-135M.

`--tinyllama`: gptq int4 g128, sparsegpt 50% and smoothquant W8A8, each with 16 x 512 calibration tokens, as whole
jobs (`execute_job` over the streaming threshold: compression, block-by-block write, block cosines, zip) on a
synthetic Llama of the TinyLlama-1.1B shape in bf16 shards (random weights; no tokenizer, so seeded random calibration
ids). Peak RSS of the child process tree, sampled every 50 ms, against the pre-flight estimate.
`--smollm2`: SmolLM2-135M (fp32 folder) compressed by both engines: rtn int4 g128 (the streaming engine) and gptq
int4 g128, sparsegpt 50%, smoothquant W8A8, svd_llm 80% (the offloaded engine), calibrated on 16 x 512 news tokens
that never overlap the 4096 perplexity tokens. The artifacts are compared bit for bit and by perplexity.

Reproduce: `.venv/bin/python -m bench.big_calibrated` (both parts; `--tinyllama` or `--smollm2` for one;
`--job "sparsegpt 50%"` for one TinyLlama job; `--smollm2-peaks [--layer-by-layer-only]` for the peak-vs-estimate
table alone; `--out FILE` writes the sections there, not to docs/benchmarks.md).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.big_models import THREADS, TINYLLAMA, measured_child, write_synthetic_llama
from bench.report import BENCHMARKS_DOC, load_average, machine_description, markdown_table, update_section

NAME = "big_calibrated"
COMMAND = f".venv/bin/python -m bench.{NAME}"
CALIBRATION = {"num_samples": 16, "seq_len": 512}
INT4_G128 = {"bits": 4, "granularity": "per_group", "group_size": 128}
BIG_STEPS = {
    "gptq int4 g128": {"type": "quantize", "method": "gptq", **INT4_G128, "calibration": CALIBRATION},
    "sparsegpt 50%": {"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "calibration": CALIBRATION},
    # the w8a8-smoothquant preset's step on the same calibration size
    "smoothquant W8A8": {"type": "quantize", "method": "smoothquant", "alpha": 0.75, "calibration": CALIBRATION},
}
PEAK_TARGET = 2.5e9
SMOLLM2_STEPS = {
    "rtn int4 g128": {"type": "quantize", "method": "rtn", **INT4_G128},
    **BIG_STEPS,
    "svd_llm 80%": {"type": "decompose", "method": "svd_llm", "params_kept": 0.8, "calibration": CALIBRATION},
}
PPL_TOLERANCE = 0.005


def run_child(step: dict[str, Any], source: Path, work: Path, threshold: int | None = 0) -> None:
    """In the child: one whole job (over the threshold unless it is None); prints one JSON line."""
    torch.set_num_threads(THREADS)
    import psutil

    from core.compression.execute import execute_job
    from core.compression.pipeline import StepHooks
    from core.compression.spec import JobSpec
    from core.compression.state import StepContext

    rss_after_imports = psutil.Process().memory_info().rss
    start = time.perf_counter()
    outcome = execute_job(source, JobSpec(steps=[step]), work, StepContext(), StepHooks(), {},
                          stream_above_bytes=threshold)
    print(json.dumps({"seconds": time.perf_counter() - start, "rss_after_imports": rss_after_imports,
                      "engine": outcome.metrics["engine"],
                      "cosine_min": outcome.metrics["after"].get("block_output_cosine_min")}))


def measured_job(step: dict[str, Any], source: Path, work: Path, threshold: int | None = 0) -> dict[str, Any]:
    command = [sys.executable, "-m", f"bench.{NAME}", "--child", json.dumps(step), str(source), str(work),
               "--child-threshold", str(-1 if threshold is None else threshold)]
    return measured_child(command, f"the {step['method']} job")


def estimated_peak(source: Path, step: dict[str, Any], threshold: int = 0) -> int:
    """The pre-flight estimate the API would store for this job (the shape facts read at upload)."""
    from core.compression.estimate import estimate_job
    from core.compression.modelio import inspect_model_folder
    from core.compression.spec import JobSpec

    info = inspect_model_folder(source, 10**12)
    spec = JobSpec(steps=[step])
    return estimate_job(info.facts(), spec.steps, "cpu", threshold).peak_host_bytes


def smollm2_peak_rows(tmp: Path, in_memory: bool = True) -> list[list[str]]:
    """Peak RSS of whole SmolLM2 jobs, in memory (unless `in_memory` is False) and over the threshold, against the
    pre-flight estimate."""
    from bench.smollm2 import smollm2_folder

    source = smollm2_folder()
    rows = []
    runs = ((None, 10**15), (0, 0)) if in_memory else ((0, 0),)
    for label in ("rtn int4 g128", "gptq int4 g128"):
        step = SMOLLM2_STEPS[label]
        for threshold, estimate_threshold in runs:
            result = measured_job(step, source, tmp / "peak", threshold)
            estimate = estimated_peak(source, step, estimate_threshold)
            error = estimate / result["peak_rss"] - 1
            rows.append([label, result["engine"], f"{result['peak_rss'] / 1e9:.2f}", f"{estimate / 1e9:.2f}",
                         f"{error * 100:+.0f}%", "yes" if abs(error) <= 0.25 else "**no**"])
            print(rows[-1], flush=True)
            shutil.rmtree(tmp / "peak", ignore_errors=True)
    return rows


def write_smollm2_peaks_section(rows: list[list[str]], doc: Path = BENCHMARKS_DOC) -> None:
    headers = ["job", "engine", "peak RSS GB", "estimate GB", "estimate vs peak", "within 25%"]
    body = (f"## Big models: the pre-flight estimate on SmolLM2-135M\n\nReproduce: `{COMMAND} --smollm2-peaks`\n\n"
            f"Machine: {machine_description()}; load average when it ended: {load_average()}.\n\n"
            "Whole jobs (`execute_job`, as the worker runs them) on the real SmolLM2-135M (fp32, 0.54 GB of weights), "
            "in memory and over the streaming threshold; gptq calibrates on 16 x 512 tokens of the default corpus. "
            "Peak RSS of the job's process tree sampled every 50 ms; the estimate is what the pre-flight stores "
            "for the job. Memory only: no times are reported.\n\n" + markdown_table(headers, rows))
    update_section(f"{NAME}_smollm2_peaks", body, doc)


def tinyllama_rows(tmp: Path, labels: list[str]) -> list[list[str]]:
    source = tmp / "tinyllama"
    params = write_synthetic_llama(source, TINYLLAMA["num_hidden_layers"])
    rows = []
    for label in labels:
        step = BIG_STEPS[label]
        result = measured_job(step, source, tmp / label.replace(" ", "-"))
        estimate = estimated_peak(source, step)
        print(label, result, estimate, flush=True)
        rows.append([label, f"{params / 1e9:.2f} B", f"{params * 2 / 1e9:.2f}", result["engine"],
                     f"{result['peak_rss'] / 1e9:.2f}", f"{PEAK_TARGET / 1e9:.1f}",
                     "yes" if result["peak_rss"] <= PEAK_TARGET else "**no**", f"{estimate / 1e9:.2f}",
                     f"{(estimate / result['peak_rss'] - 1) * 100:+.0f}%", f"{result['seconds']:.0f}",
                     f"{params / result['seconds'] / 1e6:.2f}", f"{result['cosine_min']:.4f}"])
        shutil.rmtree(tmp / label.replace(" ", "-"), ignore_errors=True)
    return rows


def smollm2_rows(tmp: Path) -> list[list[str]]:
    from bench.smollm2 import news_token_ids, news_training_texts, smollm2_folder
    from core.compression.artifact import load_compressed
    from core.compression.metrics import perplexity
    from core.compression.modelio import load_tokenizer, read_model_config

    torch.set_num_threads(THREADS)
    source = smollm2_folder()
    tokenizer = load_tokenizer(source, read_model_config(source))
    eval_ids, texts = news_token_ids(tokenizer), news_training_texts(tokenizer)
    rows = []
    for label, step in SMOLLM2_STEPS.items():
        folders = {}
        for engine, threshold in (("in memory", None), ("layer by layer", 0)):
            work = tmp / f"smollm2-{label}-{engine}".replace(" ", "-")
            metrics = _job(source, step, work, threshold, texts)
            folders[engine] = work / "model"
            print(label, engine, metrics["engine"], flush=True)
        identical = _same_tensors(folders["in memory"], folders["layer by layer"])
        with torch.no_grad():
            ppl = {engine: perplexity(load_compressed(folder), eval_ids) for engine, folder in folders.items()}
        gap = ppl["layer by layer"] / ppl["in memory"] - 1
        rows.append([label, metrics["engine"], f"{ppl['in memory']:.3f}", f"{ppl['layer by layer']:.3f}",
                     f"{gap * 100:+.3f}%", "yes" if identical else "no",
                     "yes" if abs(gap) <= PPL_TOLERANCE else "**no**"])
        print(rows[-1], flush=True)
        for folder in folders.values():
            shutil.rmtree(folder.parent, ignore_errors=True)
    return rows


def _job(source: Path, step: dict[str, Any], work: Path, threshold: int | None, texts: list[str]) -> dict[str, Any]:
    from core.compression.execute import execute_job
    from core.compression.pipeline import StepHooks
    from core.compression.spec import JobSpec
    from core.compression.state import StepContext

    ctx = StepContext(texts=lambda dataset_id: texts)
    outcome = execute_job(source, JobSpec(steps=[step]), work, ctx, StepHooks(), {}, stream_above_bytes=threshold)
    return outcome.metrics


def _same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}

    first, second = tensors(a), tensors(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def write_tinyllama_section(rows: list[list[str]], doc: Path = BENCHMARKS_DOC) -> None:
    headers = ["job", "params", "bf16 GB", "engine", "peak RSS GB", "target GB", "met", "estimate GB",
               "estimate vs peak", "wall s", "M params/s", "block cosine min"]
    body = (f"## Big models: gptq, sparsegpt and SmoothQuant with one block in memory\n\n"
            f"Reproduce: `{COMMAND} --tinyllama`\n\n"
            f"Machine: {machine_description()}; load average when it ended: {load_average()}.\n\n"
            "Whole jobs (`execute_job` over the streaming threshold: calibrated compression with one decoder block in "
            "memory at a time, the block-by-block write of the artifact, the block output cosines and the zip) on a "
            "synthetic Llama of the TinyLlama-1.1B shape (hidden 2048, 22 layers, intermediate 5632, vocab 32000, "
            "untied head) in bf16 shards with random weights; calibration: 16 x 512 seeded random token ids (the "
            "folder has no tokenizer). Peak RSS of the job's process tree sampled every 50 ms; the estimate is what "
            "the pre-flight stores for the job. Random weights make the cosines a check that blocks ran, not a "
            "quality figure (quality is the SmolLM2 section).\n\n" + markdown_table(headers, rows))
    update_section(f"{NAME}_tinyllama", body, doc)


def write_smollm2_section(rows: list[list[str]], doc: Path = BENCHMARKS_DOC) -> None:
    headers = ["step", "engine over the threshold", "PPL in memory", "PPL layer by layer", "gap", "bit-identical",
               "within 0.5%"]
    body = (f"## Big models: the layer-by-layer engines match the in-memory one on SmolLM2-135M\n\n"
            f"Reproduce: `{COMMAND} --smollm2`\n\n"
            f"Machine: {machine_description()}; load average when it ended: {load_average()}.\n\n"
            "The same job run twice on the real SmolLM2-135M (fp32): in memory, and over the streaming threshold "
            "(rtn on the tensor-by-tensor engine, the calibrated steps with one block in memory at a time). "
            "Calibration: 16 x 512 news tokens that never overlap the perplexity text (the first 4096 tokens of "
            "gensim's lee_background.cor, 512-token windows). Perplexity of each artifact loaded back with "
            "`load_compressed`. An equivalence check, not a timing: no times are reported.\n\n"
            + markdown_table(headers, rows))
    update_section(f"{NAME}_smollm2", body, doc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=3, metavar=("STEP", "SOURCE", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--child-threshold", type=int, default=0, help=argparse.SUPPRESS)  # -1: in memory
    parser.add_argument("--tinyllama", action="store_true")
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--smollm2-peaks", action="store_true", help="only the SmolLM2 peak-vs-estimate table")
    parser.add_argument("--layer-by-layer-only", action="store_true",
                        help="with --smollm2-peaks: only the jobs over the streaming threshold")
    parser.add_argument("--job", choices=sorted(BIG_STEPS), action="append",
                        help="with --tinyllama: only this job (repeatable; default both)")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_DOC,
                        help="the markdown file whose sections it writes (a copy to review instead of the docs)")
    args = parser.parse_args()
    if args.child:
        threshold = None if args.child_threshold < 0 else args.child_threshold
        run_child(json.loads(args.child[0]), Path(args.child[1]), Path(args.child[2]), threshold)
        return 0
    if args.smollm2_peaks:
        with tempfile.TemporaryDirectory(prefix="big-calibrated-") as tmp:
            write_smollm2_peaks_section(smollm2_peak_rows(Path(tmp), not args.layer_by_layer_only), args.out)
        return 0
    both = not (args.tinyllama or args.smollm2)
    with tempfile.TemporaryDirectory(prefix="big-calibrated-") as tmp:
        if args.tinyllama or both:
            write_tinyllama_section(tinyllama_rows(Path(tmp), args.job or list(BIG_STEPS)), args.out)
        if args.smollm2 or both:
            write_smollm2_section(smollm2_rows(Path(tmp)), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
