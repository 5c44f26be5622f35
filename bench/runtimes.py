"""Speed on the runtime the user names (issue 21 part 3): jobs with `"runtimes"` on the real models, through the
worker's own library path (`execute_job`), so the figures are what a job reports.

    all-MiniLM-L6-v2    weight-only int8 (rtn) and W8A8 dynamic int8, runtimes torch + onnxruntime: both runtimes'
                        batch-latency ratios; weight-only int8 decodes to float32 in torch, so the job must carry the
                        "not faster" and "not smaller in memory" flags there
    SmolLM2-135M        rtn int4 g32 (Q4_0 in GGUF) without and with the tied embedding/head quantized, runtimes
                        onnxruntime (+ llama.cpp where llama-cpp-python is installed): prefill and decode tokens/s of
                        the MatMulNBits KV-cache graph vs the fp32 one, and of our Q4_0 GGUF vs an F16 GGUF
                        (issue 21's target: llama.cpp decode >= 1.5x the F16 GGUF's)

Timings: each job's runtime figures are medians of alternating runs (core/compression/runtimes.py), with THREADS torch,
ONNX Runtime and llama.cpp threads. Run it alone on the machine: other load moves the medians.

Run: `.venv/bin/python -m bench.runtimes` (needs the `demo` and `bench-llm` extras; llama.cpp figures need the
`llamacpp` extra; ~10 minutes on 2 cores). Writes its section of docs/benchmarks.md and exits non-zero if a check fails.
`--smoke` runs the same code on tiny seeded models in a few minutes, prints the section, writes nothing and exits 0
whatever the speed checks say (tiny models show no speed-up).
"""

import argparse
import importlib.util
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from bench.report import load_average, machine_description, markdown_table, update_section
from core.compression.execute import execute_job
from core.compression.pipeline import StepHooks
from core.compression.runtimes import FASTER_BY
from core.compression.spec import JobSpec
from core.compression.state import StepContext

NAME = "runtimes"
COMMAND = ".venv/bin/python -m bench.runtimes"
THREADS = 2
LLAMA_TARGET = 1.5
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
INT8 = {"type": "quantize", "method": "rtn", "bits": 8}
DYNAMIC = {"type": "quantize", "method": "dynamic"}
G32 = {"type": "quantize", "method": "rtn", "bits": 4, "granularity": "per_group", "group_size": 32}
G32_HEAD = {**G32, "targets": ["*", "lm_head"], "include_embeddings": True}
LLM_RUNTIMES = ["onnxruntime", *(["llama.cpp"] if HAS_LLAMA_CPP else [])]


@dataclass
class Case:
    name: str
    model: str  # "minilm" or "smollm2"
    steps: list[dict[str, Any]]
    runtimes: list[str]


CASES = [
    Case("minilm-int8-weight-only", "minilm", [INT8], ["torch", "onnxruntime"]),
    Case("minilm-int8-dynamic", "minilm", [DYNAMIC], ["torch", "onnxruntime"]),
    Case("smollm2-rtn-int4-g32", "smollm2", [G32], LLM_RUNTIMES),
    Case("smollm2-rtn-int4-g32+head", "smollm2", [G32_HEAD], LLM_RUNTIMES),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny seeded models; print the section, write nothing")
    smoke = parser.parse_args().smoke
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        folders = tiny_folders(Path(tmp)) if smoke else real_folders()
        results = {case.name: run_case(case, folders[case.model], Path(tmp) / case.name) for case in CASES}
    checks = verdicts(results)
    body = section(results, checks, smoke)
    print(body)
    if smoke:  # tiny models say nothing about speed: the smoke run checks that the code runs, not the targets
        return 0
    update_section(NAME, body)
    return 0 if all(checks.values()) else 1


def real_folders() -> dict[str, Path]:
    from bench.smollm2 import smollm2_folder
    from core.compression.shipped import minilm_folder

    return {"minilm": minilm_folder(), "smollm2": smollm2_folder()}


def tiny_folders(tmp: Path) -> dict[str, Path]:
    """A 2-layer BERT (MiniLM's architecture) and a 2-layer Llama (SmolLM2's), seeded, no tokenizer."""
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=128)).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=True)).eval()
    bert.save_pretrained(tmp / "bert", safe_serialization=True)
    llama.save_pretrained(tmp / "llama", safe_serialization=True)
    return {"minilm": tmp / "bert", "smollm2": tmp / "llama"}


def run_case(case: Case, folder: Path, work: Path) -> dict[str, Any]:
    spec = JobSpec(steps=case.steps, runtimes=case.runtimes)
    outcome = execute_job(folder, spec, work, StepContext(), StepHooks(), {"benchmark": NAME})
    print(case.name, json.dumps(outcome.metrics["runtimes"], indent=1), flush=True)
    return {"runtimes": outcome.metrics["runtimes"], "notes": outcome.metrics["notes"],
            "output_cosine": outcome.metrics["output_cosine"]}


def verdicts(results: dict[str, dict[str, Any]]) -> dict[str, bool]:
    weight_only = results["minilm-int8-weight-only"]
    checks = {
        "minilm: both runtimes' latency ratios recorded": all(
            "batch_latency" in weight_only["runtimes"].get(name, {}).get("speedup", {})
            for name in ("torch", "onnxruntime")),
        "minilm weight-only int8: torch flagged (not faster or not smaller in memory), with its note": (
            not weight_only["runtimes"]["torch"]["smaller_in_memory"]
            and any(note.startswith("torch: the artifact is not") for note in weight_only["notes"])),
    }
    for name in ("smollm2-rtn-int4-g32", "smollm2-rtn-int4-g32+head"):
        record = results[name]["runtimes"]
        checks[f"{name}: onnxruntime decode tokens/s recorded vs the fp32 ONNX KV-cache graph"] = (
            "decode" in record["onnxruntime"].get("speedup", {}))
        if "llama.cpp" in record:
            decode = record["llama.cpp"].get("speedup", {}).get("decode", 0.0)
            checks[f"{name}: llama.cpp decode tokens/s >= {LLAMA_TARGET}x the F16 GGUF's"] = decode >= LLAMA_TARGET
    return checks


def section(results: dict[str, dict[str, Any]], checks: dict[str, bool], smoke: bool) -> str:
    headers = ["job", "runtime", "workload", "figure", "original (median, min-max)", "artifact (median, min-max)",
               "speedup", "memory ratio", "flags"]
    rows = [row for name, result in results.items() for runtime, record in result["runtimes"].items()
            for row in _rows(name, runtime, record)]
    verdict_lines = "\n".join(f"- {check}: {'met' if ok else 'NOT met'}" for check, ok in checks.items())
    recipes = "\n".join(f"- {case.name}: `{json.dumps({'steps': case.steps, 'runtimes': case.runtimes})}`"
                        for case in CASES)
    notes = "\n".join(f"- {name}: {note}" for name, result in results.items() for note in result["notes"])
    llama = "" if HAS_LLAMA_CPP else ("\nllama.cpp was not measured: llama-cpp-python is not installed here "
                                      "(`pip install '.[llamacpp]'`).\n")
    title = "tiny seeded models (--smoke), not a result" if smoke else "all-MiniLM-L6-v2 and SmolLM2-135M"
    return f"""## Speed on the runtime the user names: {title}

Reproduce: `{COMMAND}`

Machine: {machine_description()}; load average before the last job {load_average()}. {THREADS} threads in every
runtime. Faster = every speed figure at least {FASTER_BY}x the original's median.

{markdown_table(headers, rows)}

{verdict_lines}
{llama}
Jobs (`execute_job`, the worker's library path):
{recipes}

Job notes:
{notes or "- none"}
"""


def _rows(job: str, runtime: str, record: dict[str, Any]) -> list[list[str]]:
    if not record.get("measured", True):
        return [[job, runtime, "", "", "", "", "", "", f"not measured: {record['reason']}"]]
    workload = record["workload"]
    described = f"batch {workload['batch']} x {workload['sequence']}" + (
        f" + {workload['new_tokens']} decoded" if workload["kind"] == "causal_lm" else "")
    flags = ", ".join(flag for flag, ok in (("not faster", record["faster"]),
                                            ("not smaller", record["smaller_in_memory"])) if not ok) or "-"
    rows = []
    for figure, speedup in zip(_figures(record["original"]), record["speedup"].values(), strict=True):
        rows.append([job, runtime, described, figure, _shown(record["original"][figure]),
                     _shown(record["artifact"][figure]), f"{speedup}x", f"{record['memory_ratio']}", flags])
    return rows


def _figures(figures: dict[str, Any]) -> list[str]:
    return [name for name in figures if name.endswith(("_ms", "_per_s"))]


def _shown(value: dict[str, float]) -> str:
    return f"{value['median']} ({value['min']}-{value['max']}, {value['runs']} runs)"


if __name__ == "__main__":
    sys.exit(main())
