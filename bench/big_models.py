"""Peak memory of the layer-by-layer engine (core/compression/sequential.py) on a synthetic Llama of the TinyLlama
1.1B shape, stored as bf16 shards, against its bf16 weight bytes; and both engines side by side on a 6-layer model
of the same widths, small enough for the in-memory path.

Each compression runs in a child process whose resident memory (summed over its process tree) is sampled every
50 ms; the models are written tensor by tensor, never materialised whole. Random weights: memory and speed only,
never quality (see docs/DATA.md).

Run: `.venv/bin/python -m bench.big_models`. Writes its section of docs/benchmarks.md.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from bench.report import load_average, machine_description, markdown_table, update_section

NAME = "big_models"
COMMAND = f".venv/bin/python -m bench.{NAME}"
THREADS = 2
JOB = "job (streaming)"
TINYLLAMA = {"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False}
# Llama-2-7B's shape: 6.7 B parameters, 13.5 GB in bf16 (`--7b`: the layer-by-layer engine only).
SEVEN_B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
STEP = {"type": "quantize", "method": "rtn", "bits": 4, "granularity": "per_group", "group_size": 128}
SHARD_BYTES = 1024**3
SAMPLE_S = 0.05
# The in-memory path runs on the big model only where the peak / bf16 ratio it reaches on the 6-layer model, plus
# this margin, leaves room on this 24 GiB machine.
ESTIMATE_MARGIN = 1.2
IN_MEMORY_LIMIT_BYTES = 12e9


def write_synthetic_llama(folder: Path, layers: int, widths: dict[str, Any] = TINYLLAMA) -> int:
    """A LlamaForCausalLM folder of `widths` (the TinyLlama ones by default) with `layers` blocks, in bf16 shards with
    an index, written one tensor at a time (matrices ~N(0, 0.02), norms 1); returns the number of parameters."""
    config = LlamaConfig(**{**widths, "num_hidden_layers": layers}, architectures=["LlamaForCausalLM"],
                         dtype="bfloat16")
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in LlamaForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        shard[name] = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else random_bf16(shape)
        if sum(t.numel() * 2 for t in shard.values()) >= SHARD_BYTES:
            flush_shard(folder, shard, weight_map)
    flush_shard(folder, shard, weight_map)
    total = sum(shape.numel() for shape in shapes.values())
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def random_bf16(shape: torch.Size) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02)


def flush_shard(folder: Path, shard: dict[str, torch.Tensor], weight_map: dict[str, str]) -> None:
    name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
    save_file(shard, folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))
    shard.clear()


def measure(engine: str, source: Path, out: Path) -> dict[str, Any]:
    """Run one engine in a child process; its result line plus the peak RSS of its process tree."""
    child = subprocess.Popen([sys.executable, "-m", f"bench.{NAME}", "--child", engine, str(source), str(out)],
                             stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(SAMPLE_S)
    stdout = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        raise RuntimeError(f"{engine} child failed with {child.returncode}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss": peak}


def tree_rss(pid: int) -> int:
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.NoSuchProcess:  # it ended between the poll and the sample
        return 0


def run_child(engine: str, source: Path, out: Path) -> None:
    """In the child: compress `source` into `out` with `engine` and print one JSON line of timings."""
    torch.set_num_threads(THREADS)
    from core.compression.spec import JobSpec

    steps = JobSpec(steps=[STEP]).steps
    rss_after_imports = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if engine == "streaming":
        from core.compression.sequential import compress_streaming

        compress_streaming(source, steps, out)
    elif engine == JOB:
        streamed_job(source, out)
    else:
        in_memory(source, steps, out)
    artifact = out / "model" if engine == JOB else out
    print(json.dumps({"seconds": time.perf_counter() - start, "rss_after_imports": rss_after_imports,
                      "output_bytes": sum(p.stat().st_size for p in artifact.glob("*.safetensors"))}))


def streamed_job(source: Path, work_dir: Path) -> None:
    """What a worker runs for a model over MCS_STREAM_ABOVE_BYTES: compression, the block-by-block measurements
    and the zip of the artifact."""
    from core.compression.execute import execute_job
    from core.compression.pipeline import StepHooks
    from core.compression.spec import JobSpec
    from core.compression.state import StepContext

    execute_job(source, JobSpec(steps=[STEP]), work_dir, StepContext(), StepHooks(), {}, stream_above_bytes=0)


def in_memory(source: Path, steps: list[Any], out: Path) -> None:
    from core.compression.artifact import save_compressed
    from core.compression.modelio import load_model
    from core.compression.pipeline import run_pipeline
    from core.compression.state import ModelState, StepContext

    state = ModelState(load_model(source))
    run_pipeline(state, steps, StepContext())
    save_compressed(state, out, {}, source_dir=source)


def row(label: str, engine: str, params: int, result: dict[str, Any] | None, estimate: float) -> list[str]:
    bf16 = params * 2
    if result is None:
        return [label, engine, f"{params / 1e9:.2f} B", f"{bf16 / 1e9:.2f}",
                f"skipped (estimate {estimate / 1e9:.1f} GB)", "", "", "", "", ""]
    return [label, engine, f"{params / 1e9:.2f} B", f"{bf16 / 1e9:.2f}", f"{result['peak_rss'] / 1e9:.2f}",
            f"{result['peak_rss'] / bf16:.2f}x", f"{result['rss_after_imports'] / 1e9:.2f}",
            f"{result['seconds']:.1f}", f"{params / result['seconds'] / 1e6:.1f}",
            f"{result['output_bytes'] / 1e9:.2f}"]


def run_model(tmp: Path, label: str, layers: int, in_memory_ratio: float) -> tuple[list[list[str]], float]:
    """Both engines on one synthetic model (the in-memory one only if `in_memory_ratio` x its bf16 bytes fits);
    the table rows and the in-memory peak / bf16 ratio measured (or the one given)."""
    params = write_synthetic_llama(tmp / label, layers)
    estimate = params * 2 * in_memory_ratio * ESTIMATE_MARGIN
    rows = []
    for engine in ["streaming", JOB, "in-memory"]:
        fits = engine != "in-memory" or estimate <= IN_MEMORY_LIMIT_BYTES
        result = measure(engine, tmp / label, tmp / f"{label}-{engine}") if fits else None
        print(label, engine, result, flush=True)
        rows.append(row(label, engine, params, result, estimate))
        if result is not None and engine == "in-memory":
            in_memory_ratio = result["peak_rss"] / (params * 2)
    return rows, in_memory_ratio


def main_7b() -> int:
    """The 7B shape through the layer-by-layer engine alone (the in-memory path would need ~50 GB here)."""
    with tempfile.TemporaryDirectory(prefix="mcs-big-7b-") as tmp:
        params = write_synthetic_llama(Path(tmp) / "7b", SEVEN_B["num_hidden_layers"], SEVEN_B)
        result = measure("streaming", Path(tmp) / "7b", Path(tmp) / "7b-out")
    table = markdown_table(["model (bf16 shards)", "engine", "params", "bf16 GB", "peak RSS GB", "peak / bf16",
                            "RSS after imports GB", "wall s", "M params/s", "output GB"],
                           [row("llama-7b shape", "streaming", params, result, 0.0)])
    body = f"""## Big models: the 7B shape layer by layer

Reproduce: `{COMMAND} --7b`

Machine: {machine_description()}; load average when it ended: {load_average()}.

Step: `{STEP}` on a synthetic Llama of Llama-2-7B's shape (hidden 4096, 32 layers, intermediate 11008, 32 heads,
vocab 32000, untied head), random bf16 weights in {SHARD_BYTES / 2**30:.0f} GiB shards; peak RSS of the child
process tree sampled every {SAMPLE_S * 1000:.0f} ms. Compression only (no job measurements, no zip): the issue's
target for the whole job through the API is a peak of at most 3 GB.

{table}
"""
    update_section(f"{NAME}_7b", body)
    print(body)
    return 0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mcs-big-") as tmp:
        # The small model first: its in-memory ratio decides whether the big one's in-memory run fits.
        small, ratio = run_model(Path(tmp), "6-layer", 6, in_memory_ratio=0.0)
        big, _ = run_model(Path(tmp), "tinyllama-1.1b", TINYLLAMA["num_hidden_layers"], ratio)
    rows = big + small
    table = markdown_table(["model (bf16 shards)", "engine", "params", "bf16 GB", "peak RSS GB", "peak / bf16",
                            "RSS after imports GB", "wall s", "M params/s", "output GB"], rows)
    body = f"""## Big models: layer-by-layer rtn in bounded memory

Reproduce: `{COMMAND}`

Machine: {machine_description()}; load average when it ended: {load_average()} (the cores were shared with other
work, so times are indicative only; the memory figures are what this measures).

Step: `{STEP}` on synthetic Llamas of the TinyLlama-1.1B widths (hidden 2048, intermediate 5632, 32 heads, 4 KV
heads, vocab 32000, untied head), random bf16 weights in {SHARD_BYTES / 2**30:.0f} GiB shards. Peak RSS is the child
process's resident memory, sampled every {SAMPLE_S * 1000:.0f} ms; "RSS after imports" is its torch + transformers
floor before any weight is read. The "{JOB}" rows are a whole job, `execute_job` with `stream_above_bytes=0`: the
layer-by-layer compression, then its block-by-block measurements and the zip of the artifact. The in-memory rows are
load + pipeline + save only (an in-memory job also measures, reloads and times both models); that path runs on the
big model only if its 6-layer peak / bf16 ratio x {ESTIMATE_MARGIN} predicts under {IN_MEMORY_LIMIT_BYTES / 1e9:.0f} GB.

{table}
"""
    update_section(NAME, body)
    print(body)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        run_child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        sys.exit(0)
    if sys.argv[1:] == ["--7b"]:
        sys.exit(main_7b())
    sys.exit(main())
