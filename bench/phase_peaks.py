"""Where a layer-by-layer job's memory goes: peak RSS per phase of one `execute_job` in this process.

    .venv/bin/python -m bench.phase_peaks SRC WORK [--layers 6] [--shape 7b|tinyllama] [--step JSON]

SRC is a synthetic Llama folder (written by `bench.big_models.write_synthetic_llama` when missing); the job runs
with `stream_above_bytes=0`, so even 6 layers go through the layer-by-layer (or block-offloading) engine. A thread
samples the process's RSS every 20 ms and files each sample under the phase named by the job's last progress
message or, inside the final measurement, by the streamed pass (original or artifact) and the module being read.
One process, no Celery: a worker adds ~0.4 GB for its main process. Memory only: prints no timings worth quoting.
It wraps private functions of core.compression.execute and .streamed to label the phases: a profiling aid, not a
test; if their names change, update the wrappers.
"""

import argparse
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from bench.big_models import SEVEN_B, STEP, TINYLLAMA, write_synthetic_llama
from core.compression import execute, streamed
from core.compression.execute import execute_job
from core.compression.pipeline import StepHooks
from core.compression.spec import JobSpec
from core.compression.state import StepContext

SAMPLE_S = 0.02


class Phases:
    """Peak RSS per phase label, in the order the phases first appeared."""

    def __init__(self) -> None:
        self.label = "after imports"
        self.peaks: dict[str, int] = {}
        self.running = True
        self.process = psutil.Process()

    def sample(self) -> None:
        while self.running:
            rss = self.process.memory_info().rss
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), rss)
            time.sleep(SAMPLE_S)

    def labelled(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            previous, self.label = self.label, name
            try:
                return function(*args, **kwargs)
            finally:
                self.label = previous
        return wrapper

    def report(self, fraction: float, message: str) -> None:
        if message.startswith("compressed model.layers"):
            self.label = "compressing blocks"
        elif message == "compressed model.norm.weight":
            self.label = "compressing lm_head (after model.norm)"
        else:
            self.label = re.sub(r"\d+", "N", message)


def instrument(phases: Phases) -> None:
    execute._streamed_cosine = phases.labelled("measure: streamed cosine", execute._streamed_cosine)
    execute.block_output_cosines = phases.labelled("measure: block output cosines", execute.block_output_cosines)
    execute._zip_folder = phases.labelled("zip", execute._zip_folder)
    original_loader = streamed._loader

    def loader(reader: Any, name: str, device: Any) -> Any:
        inner = original_loader(reader, name, device)
        which = "artifact" if Path(next(iter(reader.sources.values()))).parent.name == "model" else "original"
        unit = "block layers" if ".layers." in name else name

        def load(module: Any, args: Any) -> Any:
            phases.label = f"measure: {which} pass, {unit}"
            return inner(module, args)
        return load
    streamed._loader = loader


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shape", choices=["7b", "tinyllama"], default="7b")
    parser.add_argument("--step", type=json.loads, default=STEP, help="the job's one step, as JSON")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.source.exists():
        write_synthetic_llama(args.source, args.layers, SEVEN_B if args.shape == "7b" else TINYLLAMA)
    phases = Phases()
    instrument(phases)
    sampler = threading.Thread(target=phases.sample, daemon=True)
    sampler.start()
    outcome = execute_job(args.source, JobSpec(steps=[args.step]), args.work, StepContext(report=phases.report),
                          StepHooks(), {}, stream_above_bytes=0)
    phases.running = False
    sampler.join()
    metrics = outcome.metrics
    print(json.dumps({"output_cosine": metrics.get("output_cosine"),
                      "block_output_cosine_min": metrics.get("after", {}).get("block_output_cosine_min")}))
    for label, peak in phases.peaks.items():
        print(f"{peak / 1e9:6.2f} GB  {label}")
    print(f"{max(phases.peaks.values()) / 1e9:6.2f} GB  whole job")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
