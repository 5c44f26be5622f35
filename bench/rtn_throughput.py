"""Throughput of the rtn int8 step (per-channel, symmetric, every Linear and the tied embedding) over SmolLM2-135M:
the step run through the real pipeline on a freshly loaded model, as a worker runs it, repeated; the fp32 load of
the same folder is timed beside it so the step can be compared with what a job spends anyway.

Run: `.venv/bin/python -m bench.rtn_throughput` (needs the `bench-llm` extra, see bench/smollm2.py).
Writes its section of docs/benchmarks.md and exits non-zero if the target is missed.
"""

import gc
import resource
import statistics
import sys
import time

import torch

from bench.report import load_average, machine_description, markdown_table, update_section
from bench.smollm2 import smollm2_folder
from core.compression.modelio import load_model
from core.compression.pipeline import run_pipeline
from core.compression.registry import load_step_modules
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext

NAME = "rtn_throughput"
COMMAND = f".venv/bin/python -m bench.{NAME}"
THREADS, REPEATS = 2, 5
STEP = {"type": "quantize", "method": "rtn", "bits": 8}
MIN_PARAMS_PER_S = 0.5e9


def one_run(folder) -> dict[str, float]:
    start = time.perf_counter()
    model = load_model(folder)
    loaded = time.perf_counter()
    faults, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
    [report] = run_pipeline(ModelState(model=model), JobSpec(steps=[STEP]).steps, StepContext())
    done = time.perf_counter()
    params = int(report.metrics["params_quantized"])
    del model
    gc.collect()
    return {"load_s": loaded - start, "step_s": done - loaded, "cpu_s": time.process_time() - cpu,
            "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, "params": params}


def main() -> int:
    torch.set_num_threads(THREADS)
    load_step_modules()  # a worker imports the steps once; the timed runs measure quantizing, not imports
    folder = smollm2_folder()
    runs = [one_run(folder) for _ in range(REPEATS)]
    for run in runs:
        print(run, flush=True)
    step_s = statistics.median(run["step_s"] for run in runs)
    rate = runs[0]["params"] / step_s
    ok = rate >= MIN_PARAMS_PER_S
    fill_s = fresh_memory_seconds(runs[0]["params"] * 4)
    table = markdown_table(
        ["run", "load fp32 s", "rtn int8 step s", "step CPU s", "page faults in step", "G params/s"],
        [[i + 1, f"{r['load_s']:.2f}", f"{r['step_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['faults']:,}",
          f"{r['params'] / r['step_s'] / 1e9:.3f}"] for i, r in enumerate(runs)],
    )
    body = f"""## rtn int8 throughput over SmolLM2-135M

Reproduce: `{COMMAND}`

Machine: {machine_description()}; load average when it ended: {load_average()}.

Step: `{STEP}` ({runs[0]['params']:,} parameters), each run on a freshly loaded model.

{table}

- {'met' if ok else 'NOT met'}: median {rate / 1e9:.3f} G params/s (target ≥ {MIN_PARAMS_PER_S / 1e9} G/s).
- The step encodes each block of rows and writes its decoded values while the block is in cache (one pass), into
  new memory that then replaces the weight's: a freshly loaded weight is a copy-on-write mapping of the
  safetensors file, where every first write into a page costs a fault and a copy (in place, this step took 0.70 s).
- New memory is not free either: filling {runs[0]['params'] * 4 / 2**20:,.0f} MiB of it (the decoded weights' size)
  with a constant, nothing else, took {fill_s:.3f} s here ({runs[0]['params'] / fill_s / 1e9:.2f} G params/s); on
  this VM each new page also faults in the host. Later runs in the same process partly reuse the pages the
  previous model freed (the "page faults" column), as a worker's later jobs do.
- This supersedes the throughput row of the quant_smollm2 section (measured before the one-pass change).
"""
    update_section(NAME, body)
    print(body)
    return 0 if ok else 1


def fresh_memory_seconds(nbytes: int) -> float:
    """Seconds to fill `nbytes` of newly allocated memory: the floor for any step that writes that much new data."""
    start = time.perf_counter()
    torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    return time.perf_counter() - start



if __name__ == "__main__":
    sys.exit(main())
