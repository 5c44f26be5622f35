"""SmolLM2-135M pruned to 50% by SparseGPT, then recovered with LoRA (merged): how much of the perplexity gap to
fp32 the adapters close on held-out text, and whether the sparsity survives the merge, all in one run.

Run: `.venv/bin/python -m bench.lora_smollm2 --device cuda` on a GPU machine (about 90 s on an H200). On a 2-core CPU
the 300 training steps take hours; `--lora '{"max_steps": 20}'` gives a quick check of the mechanics there.
Calibrates and trains on the news documents of lee_background.cor that follow the evaluation tokens plus the
default corpus's Wikipedia articles; perplexity is measured on the first 4,096 tokens, which are never seen.
Writes its section of docs/benchmarks.md and exits non-zero if a target is missed.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from bench.report import machine_description, markdown_table, update_section
from bench.smollm2 import EVAL_TOKENS, EVAL_WINDOW, news_token_ids, news_training_texts, smollm2_folder
from core.compression.artifact import load_compressed, save_compressed
from core.compression.corpus import default_corpus
from core.compression.metrics import perplexity
from core.compression.pipeline import run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext

NAME = "lora_smollm2"
COMMAND = f".venv/bin/python -m bench.{NAME}"
PRUNE = {"type": "prune", "method": "sparsegpt", "sparsity": 0.5, "calibration": {"num_samples": 64, "seq_len": 512}}
LORA = {"type": "lora", "rank": 16, "alpha": 32, "objective": "distill", "merge": True, "max_steps": 300,
        "lr": 5e-4, "batch_size": 8, "seq_len": 256, "checkpoint_every": 100_000, "loss": {"logits_kl": 1.0}}
MIN_GAP_CLOSED = 0.30


def fp32_model(folder: Path, device: torch.device) -> PreTrainedModel:
    """The cached fp32 folder (written by bench.smollm2 itself, so trusted), loaded fresh."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model.eval().to(device)


def pruned_zeros(model: nn.Module) -> dict[str, int]:
    """Exact zeros per Linear weight inside the decoder blocks (what the prune step selects)."""
    return {name: int((module.weight == 0).sum()) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in name}


def run_steps(state: ModelState, steps: list[dict[str, Any]], ctx: StepContext) -> tuple[list[dict], float]:
    start = time.perf_counter()
    reports = run_pipeline(state, JobSpec.model_validate({"steps": steps}).steps, ctx)
    for report in reports:
        print(json.dumps(report.metrics), report.notes[:2], flush=True)
    return [r.metrics for r in reports], time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lora", default="{}", help="JSON overrides of the lora step (exploration)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(2)
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokens = news_token_ids(tokenizer)
    texts = news_training_texts(tokenizer) + default_corpus()
    lora = {**LORA, **json.loads(args.lora)}
    ctx = StepContext(device=device, texts=lambda dataset_id: texts, teacher=lambda ref: fp32_model(folder, device),
                      report=_log)
    fp32 = perplexity(fp32_model(folder, device), tokens, EVAL_WINDOW)
    state = ModelState(model=fp32_model(folder, device), tokenizer=tokenizer)
    prune_metrics, prune_seconds = run_steps(state, [PRUNE], ctx)
    pruned = perplexity(state.model, tokens, EVAL_WINDOW)
    zeros_before = pruned_zeros(state.model)
    lora_metrics, lora_seconds = run_steps(state, [lora], ctx)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        save_compressed(state, Path(tmp), {"benchmark": NAME, "steps": [PRUNE, lora]}, source_dir=folder)
        loaded = load_compressed(tmp).to(device)
    recovered = perplexity(loaded, tokens, EVAL_WINDOW)
    result = {"fp32": fp32, "pruned": pruned, "recovered": recovered, "prune_seconds": prune_seconds,
              "lora_seconds": lora_seconds, "sparsity": prune_metrics[0]["sparsity"], "lora": lora_metrics[0],
              "zeros_kept": pruned_zeros(loaded) == zeros_before, "device": str(device)}
    print(json.dumps(result), flush=True)
    return publish(result, lora)


def publish(r: dict[str, Any], lora: dict[str, Any]) -> int:
    closed = (r["pruned"] - r["recovered"]) / (r["pruned"] - r["fp32"])
    checks = {f"closes ≥ {MIN_GAP_CLOSED:.0%} of the gap to fp32: {closed:.1%}": closed >= MIN_GAP_CLOSED,
              "every pruned zero still zero after the merge and reload": r["zeros_kept"]}
    table = markdown_table(
        ["variant", "perplexity", "vs fp32", "step seconds"],
        [["fp32", f"{r['fp32']:.2f}", "1.00×", "—"],
         ["sparsegpt 50%", f"{r['pruned']:.2f}", f"{r['pruned'] / r['fp32']:.2f}×", f"{r['prune_seconds']:.0f}"],
         ["sparsegpt 50% + LoRA (merged, artifact reloaded)", f"{r['recovered']:.2f}",
          f"{r['recovered'] / r['fp32']:.2f}×", f"{r['lora_seconds']:.0f}"]],
    )
    verdict = "\n".join(f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in checks.items())
    m = r["lora"]
    body = f"""## Recovery with LoRA: SmolLM2-135M pruned 50% (SparseGPT) + LoRA, merged

Reproduce: `{COMMAND}{' --device ' + r['device'] if r['device'] != 'cpu' else ''}`

Machine: {machine_description()}; device {r['device']}{_gpu_name(r['device'])}.

Steps: `{json.dumps(PRUNE)}`, then `{json.dumps(lora)}`.

{table}

{verdict}

- Perplexity: first {EVAL_TOKENS} tokens of `lee_background.cor`, {EVAL_WINDOW}-token windows, never calibrated or
  trained on. Calibration and training text: the lee_background documents after those tokens, plus the default
  corpus's Wikipedia articles; the lora step holds out 10% of those rows too.
- Sparsity of the pruned weights: {r['sparsity']:.4f}; the merge re-applies the masks, and the count of zeros of
  every pruned Linear was compared after saving and loading the artifact back.
- Training: {m.get('train_steps')} steps, loss {m.get('train_loss_first', float('nan')):.4f} →
  {m.get('train_loss_last', float('nan')):.4f}.
"""
    update_section(NAME, body)
    print(body)
    return 0 if all(checks.values()) else 1


def _gpu_name(device: str) -> str:
    return f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""


def _log(fraction: float, message: str) -> None:
    if not message.startswith(("pruned ", "step ")) or message.split()[1].split("/")[0].endswith("0"):
        print(f"{time.strftime('%X')} {fraction:.3f} {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
