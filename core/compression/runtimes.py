"""Speed and memory of the original and the artifact on each runtime a job names (`"runtimes"`, see
`core.compression.runtime_rules`), measured on that runtime:

    encoders     batch latency (ms) of the job's probe batch (batch and sequence length stated)
    causal LMs   prefill tokens/s (one prompt of `PROMPT_TOKENS`) and decode tokens/s (`NEW_TOKENS` greedy steps,
                 each one token with the KV cache), batch 1: llama.cpp's Python API runs one sequence

    torch        the model objects themselves (the artifact as `load_compressed` gives it), on the job's device
    onnxruntime  CPU sessions of the fp32 ONNX of the original and of the artifact's ONNX (MatMulNBits layers); a
                 causal LM runs its KV-cache graph (`export_onnx_with_past`), so decode is real decode
    llama.cpp    the artifact's GGUF export and an F16 GGUF of the original (its weights rounded to float16, what
                 llama.cpp's converter writes by default), through llama-cpp-python

The models of a runtime are timed in alternating runs (load drift hits both alike), after one untimed warm-up run
each; as many runs as fit in `BUDGET_S` (between `MIN_RUNS` and `MAX_RUNS`), so tiny models finish in a moment and
large ones still get a median. Each figure is the median with the fastest and slowest run (its spread).

"Memory" is what the runtime holds for the weights: torch the bytes of the loaded model's parameters and buffers,
onnxruntime the .onnx file (its initializers), llama.cpp the GGUF file (memory-mapped whole). A runtime where the
artifact is not faster (every speed figure at least `FASTER_BY` times the original's median) or not smaller in
memory is flagged with a plain note.
"""

import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from core.compression.metrics import PROBE_SENTENCES
from core.compression.runtime_rules import (
    LLAMA_CPP,
    MODULES,
    ONNXRUNTIME,
    RUNTIMES,
    TORCH,
    Runtime,
    installed_runtimes,
)
from core.compression.spec import model_kind

BUDGET_S, MIN_RUNS, MAX_RUNS = 3.0, 3, 10
# Below 5% the order of two medians flips from run to run on a shared CPU: such an artifact is "not faster".
FASTER_BY = 1.05
PROMPT_TOKENS, NEW_TOKENS = 64, 32

# One timed run of one model: seconds per phase, {"batch": s} (encoder) or {"prefill": s, "decode": s}.
Runner = Callable[[], dict[str, float]]


@dataclass(frozen=True)
class Workload:
    """What is timed: `sequence` is the tokens per row (encoder) or the prompt length (causal LM)."""

    kind: Literal["encoder", "causal_lm"]
    batch: int
    sequence: int
    new_tokens: int = 0
    threads: int = 1


@dataclass
class Subject:
    """One model on one runtime: how to run it once, the bytes that runtime holds for its weights, and its form."""

    run: Runner
    memory_bytes: int
    form: str


# --- timing and the verdict (pure) -------------------------------------------------------------------------------


def time_alternating(runners: Sequence[Runner], budget_s: float = BUDGET_S, min_runs: int = MIN_RUNS,
                     max_runs: int = MAX_RUNS) -> list[list[dict[str, float]]]:
    """Each runner's timed runs: one untimed warm-up each (its wall time sizes the number of runs to `budget_s`),
    then rounds that run every runner once, in turn."""
    started = time.perf_counter()
    for run in runners:
        run()
    per_round = max(time.perf_counter() - started, 1e-6)
    rounds = max(min_runs, min(max_runs, int(budget_s / per_round)))
    timings: list[list[dict[str, float]]] = [[] for _ in runners]
    for _ in range(rounds):
        for run, runs in zip(runners, timings, strict=True):
            runs.append(run())
    return timings


def spread(values: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """Median, fastest-to-slowest range and count of a figure's runs."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": len(values)}


def figure(workload: Workload, runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float | int]]:
    """The speed figures of one model's runs: `batch_latency_ms` (encoder), or `prefill_tokens_per_s` and
    `decode_tokens_per_s` (causal LM)."""
    if workload.kind == "encoder":
        return {"batch_latency_ms": spread([1000 * run["batch"] for run in runs])}
    return {"prefill_tokens_per_s": spread([workload.batch * workload.sequence / run["prefill"] for run in runs], 1),
            "decode_tokens_per_s": spread([workload.batch * workload.new_tokens / run["decode"] for run in runs], 1)}


def speedups(original: dict[str, Any], artifact: dict[str, Any]) -> dict[str, float]:
    """Artifact vs original per speed figure, > 1 when the artifact is faster: latency original / artifact,
    throughput artifact / original (medians)."""
    ratios = {}
    for name, value in original.items():
        if name.endswith("_ms"):
            ratios[name.removesuffix("_ms")] = value["median"] / artifact[name]["median"]
        elif name.endswith("_tokens_per_s"):
            ratios[name.removesuffix("_tokens_per_s")] = artifact[name]["median"] / value["median"]
    return {name: round(ratio, 3) for name, ratio in ratios.items()}


def verdict(runtime: str, original: dict[str, Any], artifact: dict[str, Any]) -> dict[str, Any]:
    """The comparison of two figures (each with `memory_bytes`) on `runtime`: speedups, memory ratio, the flags
    `faster` and `smaller_in_memory`, and a plain note for each flag that is false.
    Example: a torch artifact decoded to float32 has memory ratio 1.0, so `smaller_in_memory` is False."""
    ratios = speedups(original, artifact)
    memory_ratio = round(artifact["memory_bytes"] / original["memory_bytes"], 4)
    faster = all(ratio >= FASTER_BY for ratio in ratios.values())
    smaller = artifact["memory_bytes"] < original["memory_bytes"]
    notes = []
    if not faster:
        shown = ", ".join(f"{name.replace('_', ' ')} {ratio}x" for name, ratio in ratios.items())
        notes.append(f"{runtime}: the artifact is not faster than the original ({shown} the original's speed; "
                     f"faster means at least {FASTER_BY}x)")
    if not smaller:
        notes.append(f"{runtime}: the artifact is not smaller in memory ({_mb(artifact['memory_bytes'])} vs "
                     f"{_mb(original['memory_bytes'])} for the weights)")
    return {"speedup": ratios, "memory_ratio": memory_ratio, "faster": faster, "smaller_in_memory": smaller,
            "notes": notes}


def compare(runtime: str, workload: Workload, original: Subject, artifact: Subject,
            budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Time `original` and `artifact` on `runtime` in alternating runs and return the runtime's record."""
    original_runs, artifact_runs = time_alternating([original.run, artifact.run], budget_s)
    figures = [{**figure(workload, runs), "memory_bytes": subject.memory_bytes, "form": subject.form}
               for subject, runs in ((original, original_runs), (artifact, artifact_runs))]
    return {"workload": asdict(workload), "original": figures[0], "artifact": figures[1],
            **verdict(runtime, figures[0], figures[1])}


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


# --- torch -------------------------------------------------------------------------------------------------------


def module_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage once (tied weights share one)."""
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes()
                for tensor in [*model.parameters(), *model.buffers()] if not tensor.is_meta}
    return sum(storages.values())


def torch_subject(model: nn.Module, workload: Workload, inputs: dict[str, torch.Tensor], form: str) -> Subject:
    """`model` as torch runs it: a forward of the probe batch, or a prompt then greedy decode steps."""
    sync = torch.cuda.synchronize if inputs["input_ids"].is_cuda else (lambda: None)

    @torch.no_grad()
    def encode() -> dict[str, float]:
        start = time.perf_counter()
        model(**inputs)
        sync()
        return {"batch": time.perf_counter() - start}

    def generate() -> dict[str, float]:
        return torch_greedy(model, inputs["input_ids"], workload.new_tokens, sync)[0]

    return Subject(encode if workload.kind == "encoder" else generate, module_bytes(model), form)


@torch.no_grad()
def torch_greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                 sync: Callable[[], None] = lambda: None) -> tuple[dict[str, float], list[int]]:
    """Prefill `prompt` (batch, length), then `new_tokens` one-token steps with the KV cache, each feeding back the
    previous step's argmax: the phases' seconds and the first row's greedy tokens (new_tokens + 1 of them)."""
    start = time.perf_counter()
    outputs: Any = model(input_ids=prompt, use_cache=True)
    token = outputs.logits[:, -1:].argmax(-1)
    sync()
    prefill, tokens = time.perf_counter() - start, [token]
    start = time.perf_counter()
    for _ in range(new_tokens):
        outputs = model(input_ids=token, past_key_values=outputs.past_key_values, use_cache=True)
        token = outputs.logits[:, -1:].argmax(-1)
        tokens.append(token)
    sync()
    decode = time.perf_counter() - start
    return {"prefill": prefill, "decode": decode}, [int(t[0, 0]) for t in tokens]


# --- onnxruntime -------------------------------------------------------------------------------------------------


def onnx_session(path: Path, threads: int) -> Any:
    """A CPU session of `path` with `threads` intra-op threads (the worker's torch thread count)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def empty_cache(session: Any, batch: int) -> dict[str, np.ndarray]:
    """Zero-length `past_key_values.*` feeds of a KV-cache graph (none for a graph without a cache)."""
    return {spec.name: np.zeros((batch, spec.shape[1], 0, spec.shape[3]), dtype=np.float32)
            for spec in session.get_inputs() if spec.name.startswith("past_key_values.")}


def onnx_subject(path: Path, workload: Workload, inputs: dict[str, torch.Tensor], form: str) -> Subject:
    """An ONNX file as ONNX Runtime runs it: the probe batch, or (a KV-cache graph) a prompt then decode steps."""
    session = onnx_session(path, workload.threads)
    names = {spec.name for spec in session.get_inputs()}
    feeds = {name: value.cpu().numpy() for name, value in inputs.items() if name in names}

    def encode() -> dict[str, float]:
        start = time.perf_counter()
        session.run(None, feeds)
        return {"batch": time.perf_counter() - start}

    def generate() -> dict[str, float]:
        return onnx_greedy(session, feeds["input_ids"], workload.new_tokens)[0]

    return Subject(encode if workload.kind == "encoder" else generate, path.stat().st_size, form)


def onnx_greedy(session: Any, prompt: np.ndarray, new_tokens: int) -> tuple[dict[str, float], list[int]]:
    """`torch_greedy` on a KV-cache graph (`export_onnx_with_past`): the cache goes back in after every step."""
    batch, length = prompt.shape
    presents = [output.name for output in session.get_outputs()][1:]
    feeds = empty_cache(session, batch)
    start = time.perf_counter()
    logits, *cache = session.run(None, {"input_ids": prompt, "attention_mask": np.ones((batch, length), np.int64),
                                        **feeds})
    token = logits[:, -1:].argmax(-1)
    prefill, tokens = time.perf_counter() - start, [token]
    start = time.perf_counter()
    for _ in range(new_tokens):
        feeds = {name.replace("present", "past_key_values"): value for name, value in zip(presents, cache,
                                                                                          strict=True)}
        length += 1
        logits, *cache = session.run(None, {"input_ids": token, "attention_mask": np.ones((batch, length), np.int64),
                                            **feeds})
        token = logits[:, -1:].argmax(-1)
        tokens.append(token)
    decode = time.perf_counter() - start
    return {"prefill": prefill, "decode": decode}, [int(t[0, 0]) for t in tokens]


def same_greedy(model: nn.Module, session: Any, probe: dict[str, torch.Tensor], new_tokens: int = 8) -> bool:
    """Whether a KV-cache graph's greedy tokens for the probe's first prompt (its unmasked tokens) equal `model`'s
    (torch, on the CPU)."""
    ids, mask = probe["input_ids"][0].cpu(), probe.get("attention_mask")
    prompt = (ids[mask[0].cpu().bool()] if mask is not None else ids)[None]
    return onnx_greedy(session, prompt.numpy(), new_tokens)[1] == torch_greedy(model, prompt, new_tokens)[1]


# --- llama.cpp ---------------------------------------------------------------------------------------------------


def llama_subject(path: Path, workload: Workload, prompt: Sequence[int], form: str) -> Subject:
    """A GGUF file as llama.cpp runs it (llama-cpp-python): a prompt evaluated in one batch, then decode steps."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + workload.new_tokens + 8, n_batch=max(len(prompt), 8),
                n_threads=workload.threads, n_threads_batch=workload.threads, verbose=False)

    def generate() -> dict[str, float]:
        return llama_greedy(llm, prompt, workload.new_tokens)[0]

    return Subject(generate, path.stat().st_size, form)


def llama_greedy(llm: Any, prompt: Sequence[int], new_tokens: int) -> tuple[dict[str, float], list[int]]:
    """`torch_greedy` in llama.cpp: `eval` appends tokens to the context; the last position's logits are read from
    the context itself (llama-cpp-python keeps `scores` only with `logits_all`, which would compute every
    position's)."""
    import llama_cpp

    def last_argmax() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return int(np.argmax(logits))

    llm.reset()
    start = time.perf_counter()
    llm.eval(list(prompt))
    token = last_argmax()
    prefill, tokens = time.perf_counter() - start, [token]
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = last_argmax()
        tokens.append(token)
    return {"prefill": prefill, "decode": time.perf_counter() - start}, tokens


# --- a job's runtimes --------------------------------------------------------------------------------------------


@dataclass
class RuntimeModels:
    """What a job gives the measurement: both models loaded (on the job's device), the artifact folder (with any
    exports the job wrote), the original's folder (for its tokenizer files), scratch space for the files a runtime
    needs that the job did not export, and the workload's inputs (the probe batch, or a prompt of batch 1)."""

    original: nn.Module
    artifact: nn.Module
    folder: Path
    model_dir: Path
    scratch: Path
    workload: Workload
    inputs: dict[str, torch.Tensor]


def workload_for(model: nn.Module, tokenizer: Any, probe: dict[str, torch.Tensor]
                 ) -> tuple[Workload, dict[str, torch.Tensor]]:
    """The workload of `model` and its inputs: the probe batch for an encoder; for a causal LM one prompt of
    `PROMPT_TOKENS` (the probe sentences, repeated; seeded random ids without a tokenizer) and `NEW_TOKENS` decode
    steps, both cut to fit the model's positions."""
    threads = torch.get_num_threads()
    if model_kind(type(model).__name__) != "causal_lm":
        batch, sequence = probe["input_ids"].shape
        return Workload("encoder", int(batch), int(sequence), threads=threads), probe
    config: Any = getattr(model, "config")  # noqa: B009  (typed Any: transformers configs are dynamic)
    positions = int(getattr(config, "max_position_embeddings", None) or 2 * (PROMPT_TOKENS + NEW_TOKENS))
    length = min(PROMPT_TOKENS, positions // 2)
    new_tokens = min(NEW_TOKENS, positions - length - 1)
    if tokenizer is not None:
        ids = tokenizer(" ".join(PROBE_SENTENCES)).input_ids
        ids = (ids * (length // max(len(ids), 1) + 1))[:length]
    else:
        ids = torch.randint(0, config.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = torch.tensor([ids], device=probe["input_ids"].device)
    return Workload("causal_lm", 1, length, new_tokens, threads), {"input_ids": prompt}


def measure_runtimes(runtimes: Sequence[Runtime], models: RuntimeModels, budget_s: float = BUDGET_S
                     ) -> dict[str, dict[str, Any]]:
    """One record per runtime (`compare`), or `{"measured": False, "reason", "notes"}` for a runtime this process
    lacks or that could not run the model: the artifact is already written, so a failed timing is reported, not
    raised."""
    results: dict[str, dict[str, Any]] = {}
    # torch first: the other runtimes' exports move both models to the CPU
    for runtime in sorted(runtimes, key=RUNTIMES.index):
        try:
            if runtime not in installed_runtimes():
                raise RuntimeError(f"this worker has no {MODULES[runtime]} package (the job was accepted before any "
                                   "worker of its queue reported its runtimes)")
            original, artifact = SUBJECTS[runtime](models)
            results[runtime] = compare(runtime, models.workload, original, artifact, budget_s)
        except Exception as exc:  # an export or a runtime's own failure: many types, all reported the same way
            reason = f"{type(exc).__name__}: {str(exc)[:500]}"
            results[runtime] = {"measured": False, "reason": reason, "notes": [f"{runtime}: not measured: {reason}"]}
    shutil.rmtree(models.scratch, ignore_errors=True)
    return results


def _torch_subjects(models: RuntimeModels) -> tuple[Subject, Subject]:
    return (torch_subject(models.original, models.workload, models.inputs, "the uploaded model, float32"),
            torch_subject(models.artifact, models.workload, models.inputs, "the artifact as load_compressed loads it"))


def _onnx_subjects(models: RuntimeModels) -> tuple[Subject, Subject]:
    from core.compression.artifact import read_manifest, stored_encodings
    from core.compression.exports.onnx import CACHE_ONNX_FILE, ONNX_FILE
    from core.compression.exports.onnx_nbits import plan_nbits

    causal = models.workload.kind == "causal_lm"
    inputs = {name: value.cpu() for name, value in models.inputs.items()}
    mine = models.folder / (CACHE_ONNX_FILE if causal else ONNX_FILE)
    if not mine.is_file():  # the job did not export ONNX: written to scratch for the timing only
        artifact = models.artifact.cpu()
        plan = plan_nbits(artifact, stored_encodings(models.folder), read_manifest(models.folder).aliases)
        mine = _onnx_file(artifact, models.scratch / "onnx-artifact", causal, inputs, plan)
    original = _onnx_file(models.original.cpu(), models.scratch / "onnx-original", causal, inputs, None)
    form = "KV-cache graph" if causal else "graph"
    return (onnx_subject(original, models.workload, inputs, f"float32 ONNX {form}"),
            onnx_subject(mine, models.workload, inputs, f"the artifact's ONNX {form} (MatMulNBits layers)"))


def _onnx_file(model: nn.Module, folder: Path, causal: bool, inputs: dict[str, torch.Tensor], plan: Any) -> Path:
    from core.compression.exports.onnx import export_onnx, export_onnx_with_past

    return export_onnx_with_past(model, folder, plan) if causal else export_onnx(model, folder, inputs, plan)


def _llama_subjects(models: RuntimeModels) -> tuple[Subject, Subject]:
    from core.compression.artifact import save_compressed
    from core.compression.exports.gguf import GGUF_FILE, export_gguf
    from core.compression.modelio import load_model
    from core.compression.state import ModelState

    if models.workload.kind != "causal_lm":
        raise ValueError("llama.cpp runs causal LMs only")
    mine = models.folder / GGUF_FILE
    if not mine.is_file():  # the job did not export GGUF: written to scratch for the timing only
        mine = export_gguf(models.folder, models.scratch / "artifact.gguf").path
    rounded = load_model(models.model_dir, "cpu").half().float()  # every weight exact in float16: written as F16
    folder = save_compressed(ModelState(rounded), models.scratch / "original-f16", {}, source_dir=models.model_dir)
    del rounded
    original = export_gguf(folder, models.scratch / "original-f16.gguf").path
    prompt = models.inputs["input_ids"][0].tolist()
    return (llama_subject(original, models.workload, prompt, "F16 GGUF of the original"),
            llama_subject(mine, models.workload, prompt, "the artifact's GGUF export"))


SUBJECTS: dict[str, Callable[[RuntimeModels], tuple[Subject, Subject]]] = {
    TORCH: _torch_subjects, ONNXRUNTIME: _onnx_subjects, LLAMA_CPP: _llama_subjects,
}

