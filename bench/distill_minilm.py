"""Recovery training on the real all-MiniLM-L6-v2, one recipe per section of docs/benchmarks.md: 50% magnitude
pruning + distillation, a 3-of-6-layer student, the deep-compression chain (prune → kmeans → distill → huffman) and
low-rank + distillation. Each recipe runs through the real pipeline, is saved, loaded back with `load_compressed`
and measured against fp32 in the same run, beside the same compression without recovery training.

Run: `.venv/bin/python -m bench.distill_minilm --only prune` (or student, chain, lowrank; no `--only` runs all,
one after the other). Needs the `demo` extra. Trains on gensim's lee_background.cor and Wikipedia text (the distill
step holds out 10% of those rows and reports its held-out cosine); the review sentences the table's cosine is
measured on are never trained on. Writes each recipe's section; exits non-zero if a target is missed.
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from bench.report import load_average, machine_description, markdown_table, update_section
from core.compression.artifact import load_compressed, save_compressed
from core.compression.configs.training import TrainingStep
from core.compression.corpus import default_corpus
from core.compression.metrics import weights_size_bytes
from core.compression.modelio import load_model
from core.compression.pipeline import run_pipeline
from core.compression.shipped import THREADS, Variant, measure, minilm_folder, package_dir
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext
from core.compression.training.data import split_rows

NAME = "distill_minilm"
COMMAND = f".venv/bin/python -m bench.{NAME}"
# The benchmark's training recipe (the step's default lr is gentler): every layer's hidden states as targets, a
# high peak lr (warm-up, then linear decay), short windows (the review sentences are short; the cost of a step is
# its token count), no checkpoints (nothing resumes here). Adding the sentence-embedding cosine as a target scored
# lower on held-out text at the same steps (see docs/decisions.md), and so did peak lr 3e-4 and 1.5e-3.
TRAIN = {"lr": 7e-4, "batch_size": 8, "seq_len": 32, "checkpoint_every": 100_000, "loss": {"hidden_mse": 1.0}}
PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global"}
# Deep compression: every Linear and the token table pruned (the small position and token-type tables stay dense:
# global magnitude pruning took 85% and 97% of them), then 16 shared values (4-bit indices) per row of each FFN
# matrix, per hidden dimension (column) of the embedding tables and per tensor elsewhere. At 50% sparsity the mask and
# the indices alone take 3 bits a weight (8.5 MB of the 9.09 MB that 10x allows), so codebooks must stay small: one
# per row of the 30,522-row token table would cost 1 MB, per row of the attention matrices 0.3 MB; per column of the
# token table costs 12 kB and won back most of the 0.011 cosine its per-tensor codebook lost.
CHAIN = [{**PRUNE, "include_embeddings": True,
          "exclude": ["embeddings.position_embeddings", "embeddings.token_type_embeddings"]},
         {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_channel",
          "targets": ["*.intermediate.dense", "*.output.dense"], "exclude": ["*.attention.*"]},
         {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_column",
          "targets": ["embeddings.word_embeddings", "embeddings.position_embeddings"]},
         {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_tensor",
          "targets": ["embeddings.token_type_embeddings", "*.attention.*", "pooler.*"]}]
HUFFMAN = {"type": "encode", "method": "huffman"}
# The chain's distill steps; after a kmeans step the centroids train (and every still-free weight).
CENTROIDS = {"type": "distill", "max_steps": 1000, "train_embeddings": True, **TRAIN}
# The distill step's training rows (its held-out rows removed): calibration for steps that fit on their text.
TRAIN_ROWS = "train-rows"
# SVD-LLM, then each block's factors trained to reproduce the block's fp32 outputs. Held-out cosine after 800 distill
# steps (one-off runs): 64 calibration windows 0.890, 256 windows 0.893, 256 windows + reconstruction 0.898.
LOWRANK = {"type": "decompose", "method": "svd_llm", "params_kept": 0.7,
           "calibration": {"dataset_id": TRAIN_ROWS, "num_samples": 256, "seq_len": 128},
           "reconstruct": {"epochs": 2, "lr": 3e-4}}


@dataclass
class Recipe:
    """Steps with recovery training, the same compression without it (the baseline row) and the targets."""

    title: str
    steps: list[dict]
    untrained: list[dict]
    min_cosine: float
    extra_checks: Callable[["Result"], dict[str, bool]] = field(default=lambda result: {})


@dataclass
class Artifact:
    """One recipe's artifact: the model loaded back, its file size, the steps' reports, the pipeline's time."""

    model: nn.Module
    size_bytes: int
    metrics: list[dict]
    seconds: float
    cpu_seconds: float
    threads: int


@dataclass
class Result:
    recipe: Recipe
    trained: Artifact
    fp32: Variant
    untrained_v: Variant
    trained_v: Variant

    @property
    def distill_metrics(self) -> dict:
        """The last distill step's metrics: its held-out cosine is the final model's."""
        return [m for m in self.trained.metrics if "heldout_cosine_after" in m][-1]


def _prune_checks(result: Result) -> dict[str, bool]:
    return {"pipeline within 15 minutes": result.trained.seconds <= 15 * 60,
            "sparsity exactly 50% after load": linear_sparsity(result.trained.model) == 0.5}


def _student_checks(result: Result) -> dict[str, bool]:
    return {"latency ≤ 0.55× fp32": result.trained_v.latency_ms / result.fp32.latency_ms <= 0.55}


def _chain_checks(result: Result) -> dict[str, bool]:
    return {"file ≥ 10× smaller than fp32": result.fp32.size_bytes / result.trained_v.size_bytes >= 10}


RECIPES = {
    "prune": Recipe("50% magnitude prune + distill",
                    [PRUNE, {"type": "distill", "max_steps": 1400, **TRAIN}], [PRUNE], 0.95, _prune_checks),
    "student": Recipe("3-of-6-layer student, distilled",
                      [{"type": "distill", "student": {"layers": 3}, "max_steps": 2400, **TRAIN}],
                      [], 0.90, _student_checks),
    # Deep Compression's order (the pruned weights are retrained before they are shared, then the centroids),
    # sharing in two rounds as in incremental network quantization: the FFN matrices first, while the attention
    # and embedding weights are still free to make up for their error, then the rest (see docs/decisions.md).
    "chain": Recipe("deep compression: prune 50% → distill → kmeans 4-bit in two rounds, each distilled → huffman",
                    [CHAIN[0], {**CENTROIDS, "max_steps": 3000}, CHAIN[1], CENTROIDS, *CHAIN[2:], CENTROIDS, HUFFMAN],
                    [*CHAIN, HUFFMAN], 0.95, _chain_checks),
    # Factored layers train best at a lower peak lr: held-out cosine after 800 steps (one-off runs of this recipe)
    # 0.874 at 1.5e-3, 0.896 at 7e-4, 0.902 at 3e-4, 0.900 at 1.5e-4; training the embeddings too (0.895), an
    # attention-probability term (0.896) or factoring the FFN first and the attention after (0.883) did not help.
    # The held-out loss stays close to the training loss (0.107 vs 0.100 at 800 steps): the factored model is short
    # of steps, not of text. 6,400 steps gave 0.931 (calibrated on text that included held-out rows), 25,600 steps of
    # 8 windows in fp32 0.942 (training rows only). bf16 mixed precision (0.8976 at 800 steps, as fp32) makes a step
    # of 16 windows cost what one of 8 did in fp32 on AVX512-BF16 CPUs: 64,000 of them (5x the tokens) reach 0.952.
    "lowrank": Recipe("low-rank (svd_llm, 70% of each layer's parameters) + distill",
                      [LOWRANK, {"type": "distill", "max_steps": 64000,
                                 **{**TRAIN, "lr": 4e-4, "batch_size": 16, "precision": "bf16"}}], [LOWRANK], 0.95),
}


def training_texts() -> list[str]:
    """lee_background.cor's 300 news documents plus the Wikipedia articles of the default corpus."""
    path = package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    news = [line for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]
    return news + default_corpus()


def compress(steps: list[dict], folder: Path, out_dir: Path, texts: list[str]) -> Artifact:
    """Run `steps` through the real pipeline, save the artifact and load it back."""
    state = ModelState(load_model(folder), tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))
    train_rows = split_rows(texts, TrainingStep.model_fields["eval_fraction"].default,
                            TrainingStep.model_fields["seed"].default)[0]
    ctx = StepContext(texts=lambda dataset_id: train_rows if dataset_id == TRAIN_ROWS else texts,
                      teacher=lambda ref: load_model(folder), report=_log)
    start, cpu_start = time.perf_counter(), time.process_time()
    reports = run_pipeline(state, JobSpec.model_validate({"steps": steps}).steps, ctx)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    save_compressed(state, out_dir, {"benchmark": NAME, "steps": steps}, source_dir=folder)
    for report in reports:
        print(json.dumps(report.metrics), report.notes, flush=True)
    return Artifact(load_compressed(out_dir), weights_size_bytes(out_dir), [r.metrics for r in reports], seconds,
                    cpu_seconds, torch.get_num_threads())


def linear_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the weights of every nn.Linear (what the prune step selects by default)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run(key: str, folder: Path, texts: list[str], threads: int) -> int:
    recipe = RECIPES[key]
    torch.set_num_threads(threads)  # measure() sets THREADS again for the table
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        trained = compress(recipe.steps, folder, Path(tmp) / "trained", texts)
        untrained = (compress(recipe.untrained, folder, Path(tmp) / "untrained", texts) if recipe.untrained
                     else None)
    untrained_model = untrained.model if untrained else load_model(folder)
    untrained_size = untrained.size_bytes if untrained else weights_size_bytes(folder)
    fp32, untrained_v, trained_v = measure(folder, [(_untrained_name(recipe), untrained_model, untrained_size),
                                                    (recipe.title, trained.model, trained.size_bytes)])
    result = Result(recipe, trained, fp32, untrained_v, trained_v)
    # The targets are on held-out text; the review sentences (another domain) are checked too, beside them.
    checks = {
        f"held-out cosine ≥ {recipe.min_cosine}": result.distill_metrics["heldout_cosine_after"] >= recipe.min_cosine,
        **recipe.extra_checks(result),
    }
    beyond = {f"review cosine ≥ {recipe.min_cosine}": trained_v.cosine_mean >= recipe.min_cosine}
    body = section(key, result, checks, beyond)
    update_section(f"{NAME}_{key}", body)
    print(body)
    return 0 if all(checks.values()) else 1


def _untrained_name(recipe: Recipe) -> str:
    return "same compression, no recovery" if recipe.untrained else "6-layer fp32 (what the student starts from)"


def section(key: str, result: Result, checks: dict[str, bool], beyond: dict[str, bool]) -> str:
    recipe, trained = result.recipe, result.trained
    headers = ["variant", "weights MB", "size vs fp32", "parameters", "review cosine mean (min)", "latency ms",
               "latency vs fp32"]
    rows = [[v.name, f"{v.size_bytes / 1e6:.2f}", f"{v.size_bytes / result.fp32.size_bytes:.3f}×",
             f"{v.parameters:,}", f"{v.cosine_mean:.4f} ({v.cosine_min:.4f})", f"{v.latency_ms:.1f}",
             f"{v.latency_ms / result.fp32.latency_ms:.3f}×"]
            for v in (result.fp32, result.untrained_v, result.trained_v)]
    verdict, also = (_verdict(c) for c in (checks, beyond))
    extra = ""
    if key == "prune":
        extra = f" Sparsity of the Linear weights after load: {linear_sparsity(trained.model):.6f}."
    return f"""## Recovery training on all-MiniLM-L6-v2: {recipe.title}

Reproduce: `{COMMAND} --only {key}`

Machine: {machine_description()}; load average while it ran: {load_average()}.

Recipe: `{json.dumps(recipe.steps)}`

{markdown_table(headers, rows)}

- Targets (issue #5): {verdict}. Also checked, beyond the issue: {also}.
- Pipeline (compression + training) took {trained.seconds / 60:.1f} min wall, {trained.cpu_seconds / 60:.1f}
  CPU-minutes with {trained.threads} torch thread(s); with a load average above 2 (see above) other jobs shared
  the 2 cores and the wall time is an upper bound.{extra}
{_training_lines(trained.metrics)}
- Training text: gensim's lee_background.cor (300 news documents) + the default corpus's Wikipedia articles.
  Review cosine: the 200 review sentences of gensim's `pang_lee_polarity.cor` (never trained on) vs fp32; latency:
  8 × 128 tokens, {THREADS} threads, rounds interleaved with fp32; size: the artifact's `*.safetensors`; all
  measured on the artifacts loaded back with `core.load_compressed`.
"""


def _verdict(checks: dict[str, bool]) -> str:
    return "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in checks.items())


def _training_lines(reports: list[dict]) -> str:
    """One bullet per distill step: steps, loss, held-out cosine before and after."""
    runs = [m for m in reports if "heldout_cosine_after" in m]
    lines = []
    for i, m in enumerate(runs):
        which = f" (distill step {i + 1} of {len(runs)})" if len(runs) > 1 else ""
        lines.append(f"- Training{which}: {m['train_steps']} steps, loss {m['train_loss_first']:.4f} → "
                     f"{m['train_loss_last']:.4f}; held-out windows (10% of the rows, never trained on) cosine "
                     f"{m['heldout_cosine_before']:.4f} before → {m['heldout_cosine_after']:.4f} after.")
    return "\n".join(lines)



def _log(fraction: float, message: str) -> None:
    """Training progress every 50 steps, step messages other than per-weight ones as they come."""
    if message.startswith("step "):
        if int(message.split()[1].split("/")[0]) % 50 == 0:
            print(f"{time.strftime('%X')} {fraction:.3f} {message}", flush=True)
    elif not message.startswith(("pruned ", "quantized ")):
        print(f"{time.strftime('%X')} {fraction:.3f} {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RECIPES), action="append", help="run only this recipe (repeatable)")
    # Recipes can then run side by side on a shared CPU without oversubscribing it; latency is always measured
    # with THREADS threads.
    parser.add_argument("--train-threads", type=int, default=THREADS, help=f"torch threads for the pipeline "
                        f"(default {THREADS})")
    args = parser.parse_args()
    folder, texts = minilm_folder(), training_texts()
    failures = sum(run(key, folder, texts, args.train_threads) for key in args.only or list(RECIPES))
    print(f"CPU seconds: {resource.getrusage(resource.RUSAGE_SELF).ru_utime:.0f} user", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
