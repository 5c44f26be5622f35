"""Run one job's recipe on a model folder and produce the artifact and its before/after numbers.

Pure orchestration over core (no database, no queue): the worker gives it a folder, a recipe, a context and hooks,
and records what comes back. The "after" numbers are measured on the artifact loaded back from disk, so they are
what the user will get, not what the in-memory model promised.
"""


import dataclasses
import errno
import logging
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerBase

from core.compression import metrics
from core.compression.archive import ARTIFACT_LIMITS, extract_archive
from core.compression.artifact import load_compressed, save_compressed
from core.compression.estimate import Engine, ModelFacts, choose_engine
from core.compression.evaluate import (
    BATCH,
    STREAMED_BATCH,
    EvaluationRequest,
    StepQuality,
    evaluate_model,
    evaluate_models,
)
from core.compression.export_rules import COMPRESSED_TENSORS, GGUF, ONNX
from core.compression.exports.onnx import CACHE_ONNX_FILE, export_onnx, export_onnx_with_past
from core.compression.modelio import load_model, load_tokenizer, meta_model, model_class_for, read_model_config
from core.compression.offload import offloaded_state, return_freed_memory, save_offloaded
from core.compression.pipeline import StepHooks, run_pipeline
from core.compression.runtimes import (
    RuntimeModels,
    empty_cache,
    measure_runtimes,
    onnx_session,
    same_greedy,
    workload_for,
)
from core.compression.sequential import block_output_cosines, compress_streaming
from core.compression.spec import JobSpec, model_kind
from core.compression.state import ModelState, StepContext, StepReport
from core.compression.streamed import streamed_model
from core.compression.waterfall import WATERFALL, Waterfall, byte_breakdown, skipped, weight_errors
from core.errors import InputUnreadable, ServiceError, StepFailed, UnsupportedModel

log = logging.getLogger(__name__)
STREAMING_NOTE = ("layer-by-layer engine (the model's weight files are over the streaming threshold): "
                  "output_cosine = the saved artifact vs the original on the fixed probe inputs, each run forward "
                  "with one decoder block read from its files at a time (the same float32 arithmetic as a loaded "
                  "model); block_output_cosine_min/mean = cosine of what each decoder block of the artifact adds "
                  "to a seeded random hidden state vs the original block's; latency_ms is not measured (null): a "
                  "forward pass that reads its blocks from disk would time the disk, not the model")
OFFLOADED_NOTE = ("block-offloading engine (the model's weight files are over the streaming threshold): the "
                  "calibrated steps ran one decoder block in memory at a time; " + STREAMING_NOTE.split("): ", 1)[1])
PIPELINE_SHARE = (0.1, 0.8)
# OS errors that say the storage itself is failing (worth a retry), not that the stored input is broken.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT, errno.ENETDOWN,
                              errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNRESET, errno.ENOSPC, errno.EDQUOT})


@dataclass
class JobOutcome:
    artifact: Path
    metrics: dict[str, Any]


@dataclass
class _Probe:
    inputs: dict[str, Any]
    reference: Any

    def cosine(self, model: Any) -> float:
        outputs = metrics.model_outputs(model, self.inputs)
        return metrics.output_cosine(self.reference, outputs, self.inputs.get("attention_mask"))


def execute_job(model_dir: Path, spec: JobSpec, work_dir: Path, ctx: StepContext, hooks: StepHooks,
                provenance: dict[str, Any], stream_above_bytes: int | None = None,
                evaluation: EvaluationRequest | None = None) -> JobOutcome:
    """Load, measure, compress, save, reload and measure again. A re-attempt of the same job reuses `work_dir`:
    its `steps/` folder holds the training steps' checkpoints; the previous attempt's output is discarded.

    A model whose weight files exceed `stream_above_bytes` (None: never) runs on the engine `engine_for` chooses
    (tensor by tensor for rtn/fp8, blocks offloaded for the calibrated steps), with measurements that never hold
    the model.
    Example: `execute_job(folder, spec, work, StepContext(), StepHooks(), {"job_id": "j1"}, 2 * 1024**3)`.
    """
    shutil.rmtree(work_dir / "model", ignore_errors=True)
    (work_dir / "model.zip").unlink(missing_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    engine = engine_for(model_dir, spec, stream_above_bytes)
    if engine == "streaming":
        return _evaluated(_execute_streaming(model_dir, spec, work_dir, ctx, hooks, provenance), evaluation,
                          model_dir, ctx)
    if engine == "offloaded":
        return _evaluated(_execute_offloaded(model_dir, spec, work_dir, ctx, hooks, provenance), evaluation,
                          model_dir, ctx)
    model = load_input(model_dir, ctx.device)
    tokenizer = _tokenizer(model_dir)
    probe = _probe(model, tokenizer)
    before = _measure(model, probe, metrics.weights_size_bytes(model_dir))
    ctx.report(PIPELINE_SHARE[0], "measured the original model")
    state = ModelState(model, tokenizer=tokenizer)
    quality = StepQuality(evaluation, model, tokenizer) if evaluation is not None else None
    reports = run_pipeline(state, spec.steps, _scaled(_with_teacher(ctx, model_dir), *PIPELINE_SHARE, work_dir), hooks,
                           evaluate=Waterfall.start(state, probe.cosine, probe.inputs, quality))
    ctx.report(PIPELINE_SHARE[1], "saving the artifact")
    folder = work_dir / "model"
    save_compressed(state, folder, _manifest(spec, reports, before, provenance), source_dir=model_dir)
    del state, model
    ctx.report(0.9, "measuring the saved artifact")
    loaded = load_compressed(folder).to(ctx.device)
    after = _measure(loaded, probe, metrics.weights_size_bytes(folder))
    reference = load_input(model_dir, ctx.device)
    before["latency_ms"], after["latency_ms"] = metrics.interleaved_latency_ms([reference, loaded], probe.inputs)
    layers = {"metric": "relative_weight_error", "values": weight_errors(reference, loaded),
              "note": "||W_artifact - W_original|| / ||W_original|| of each matrix kept under its name and shape"}
    del reference
    if ONNX in spec.export:
        ctx.report(0.95, "exporting to ONNX")
        after.update(_export_onnx(loaded, folder, probe))
    if COMPRESSED_TENSORS in spec.export:
        ctx.report(0.96, "exporting to compressed-tensors")
        after.update(_export_compressed_tensors(folder, probe, ctx.device))
    if GGUF in spec.export:
        ctx.report(0.97, "exporting to GGUF")
        after.update(_export_gguf(folder, loaded, probe, ctx.device))
    timed = _runtimes(spec, model_dir, work_dir, loaded, tokenizer, probe, ctx) if spec.runtimes else {}
    archive = _zip_folder(folder, work_dir / "model.zip")
    outcome = JobOutcome(archive, {**_summary(before, after, archive, ctx), "engine": "in_memory", "layers": layers,
                                   **timed})
    return _evaluated(outcome, evaluation, model_dir, ctx, loaded)


def engine_for(model_dir: Path, spec: JobSpec, stream_above_bytes: int | None) -> Engine:
    """The engine `execute_job` runs this job on, chosen as the pre-flight estimate chooses it (`choose_engine`):
    the size is that of the weight files, so nothing is loaded to decide."""
    facts = ModelFacts(num_parameters=0, weight_bytes=metrics.weights_size_bytes(model_dir))
    return choose_engine(facts, [type(step) for step in spec.steps], stream_above_bytes,
                         bool(spec.export or spec.runtimes))  # both need the whole model in memory


def _execute_streaming(model_dir: Path, spec: JobSpec, work_dir: Path, ctx: StepContext, hooks: StepHooks,
                       provenance: dict[str, Any]) -> JobOutcome:
    """Compress with `compress_streaming` and measure from the files: parameters from the meta model, sizes from
    the weight files, quality as each block's output cosine (`block_output_cosines`). No whole-model output cosine
    and no latency: both need the whole model in memory, which is what this path avoids."""
    folder = work_dir / "model"
    with reading_input("the uploaded model"):
        config = read_model_config(model_dir)
        parameters = metrics.count_parameters(meta_model(model_class_for(config), config))
    before = {"size_bytes": metrics.weights_size_bytes(model_dir), "parameters": parameters,
              "output_cosine": None, "latency_ms": None}
    ctx.report(PIPELINE_SHARE[0], "measured the original model's files")
    for index, step in enumerate(spec.steps):  # the steps run together, block by block
        hooks.started(index, step)
    reports = compress_streaming(model_dir, list(spec.steps), folder, _scaled(ctx, *PIPELINE_SHARE, work_dir),
                                 lambda step_reports: _manifest(spec, step_reports, before, provenance))
    for index, report in enumerate(reports):
        report.metrics[WATERFALL] = skipped("layer_by_layer")
        hooks.finished(index, report)
    ctx.report(0.9, "measuring the saved artifact block by block")
    after = _measure_streamed(model_dir, folder, before, ctx.device)
    archive = _zip_folder(folder, work_dir / "model.zip")
    return JobOutcome(archive, {**_summary(before, after, archive, ctx), "engine": "layer_by_layer",
                                "note": STREAMING_NOTE})


def _execute_offloaded(model_dir: Path, spec: JobSpec, work_dir: Path, ctx: StepContext, hooks: StepHooks,
                       provenance: dict[str, Any]) -> JobOutcome:
    """Run the recipe's block-by-block steps with one block in memory at a time (`offloaded_state`), write the
    artifact block by block, and measure it from the files as `_execute_streaming` does."""
    folder, scratch = work_dir / "model", work_dir / "blocks"
    shutil.rmtree(scratch, ignore_errors=True)
    tokenizer = _tokenizer(model_dir)
    with reading_input("the uploaded model"):
        state = offloaded_state(model_dir, scratch, ctx.device, tokenizer)
    before = {"size_bytes": metrics.weights_size_bytes(model_dir), "parameters": metrics.count_parameters(state.model),
              "output_cosine": None, "latency_ms": None}
    ctx.report(PIPELINE_SHARE[0], "read the model's embeddings and head; blocks are read one at a time")
    reports = run_pipeline(state, spec.steps, _scaled(ctx, *PIPELINE_SHARE, work_dir), hooks,
                           evaluate=lambda _: {WATERFALL: skipped("offloaded")})
    ctx.report(PIPELINE_SHARE[1], "saving the artifact block by block")
    save_offloaded(state, folder, _manifest(spec, reports, before, provenance), source_dir=model_dir)
    del state
    shutil.rmtree(scratch, ignore_errors=True)
    ctx.report(0.9, "measuring the saved artifact block by block")
    after = _measure_streamed(model_dir, folder, before, ctx.device)
    archive = _zip_folder(folder, work_dir / "model.zip")
    return JobOutcome(archive, {**_summary(before, after, archive, ctx), "engine": "offloaded",
                                "note": OFFLOADED_NOTE})


def _evaluated(outcome: JobOutcome, request: EvaluationRequest | None, model_dir: Path, ctx: StepContext,
               loaded: Any = None) -> JobOutcome:
    """The outcome with the job's `evaluation` (core.compression.evaluate) when it asked for one: the original
    and the saved artifact (`loaded`; None: both run from their folders one block at a time, `streamed_model`).
    Overlap with the calibration/training data is also logged and listed in `warnings`."""
    if request is None:
        return outcome
    ctx.report(0.98, f"evaluating on dataset {request.dataset_id}")
    folder = outcome.artifact.parent / "model"
    if loaded is None:
        result = evaluate_models(request, lambda: streamed_model(model_dir, ctx.device),
                                 lambda: streamed_model(folder, ctx.device), _tokenizer(model_dir), STREAMED_BATCH)
    else:
        result = evaluate_models(request, lambda: nullcontext(load_input(model_dir, ctx.device)),
                                 lambda: nullcontext(loaded), _tokenizer(model_dir))
    outcome.metrics["evaluation"] = result
    if warning := result["overlap"]["warning"]:
        log.warning("%s", warning)
        outcome.metrics["warnings"] = [*outcome.metrics.get("warnings", []), warning]
    return outcome


def evaluate_standalone(model_dir: Path, artifact_zip: Path | None, request: EvaluationRequest, work_dir: Path,
                        ctx: StepContext, stream_above_bytes: int | None = None) -> dict[str, Any]:
    """A standalone evaluation (an evaluation job, no steps): with `artifact_zip`, that artifact against the original
    it was made from, as a job's own `evaluate` measures them; without, the model of `model_dir` alone (values with
    CIs, no deltas). A model whose weight files exceed `stream_above_bytes` runs one block in memory at a time.
    Example: `evaluate_standalone(folder, work / "model.zip", request, work, StepContext(), 2 * 1024**3)`."""
    streams = stream_above_bytes is not None and metrics.weights_size_bytes(model_dir) > stream_above_bytes
    tokenizer = _tokenizer(model_dir)
    ctx.report(0.05, f"evaluating on dataset {request.dataset_id}")
    if artifact_zip is None:
        opener = (lambda: streamed_model(model_dir, ctx.device)) if streams else (
            lambda: nullcontext(load_input(model_dir, ctx.device)))
        return {**evaluate_model(request, opener, tokenizer, STREAMED_BATCH if streams else BATCH),
                "engine": "layer_by_layer" if streams else "in_memory"}
    shutil.rmtree(work_dir / "artifact", ignore_errors=True)
    with reading_input("the artifact"):
        folder = extract_archive(artifact_zip, work_dir / "artifact", ARTIFACT_LIMITS)
    if streams:
        result = evaluate_models(request, lambda: streamed_model(model_dir, ctx.device),
                                 lambda: streamed_model(folder, ctx.device), tokenizer, STREAMED_BATCH)
    else:
        result = evaluate_models(request, lambda: nullcontext(load_input(model_dir, ctx.device)),
                                 lambda: nullcontext(_artifact_on(folder, ctx.device)), tokenizer)
    return {**result, "engine": "layer_by_layer" if streams else "in_memory"}


def _artifact_on(folder: Path, device: torch.device) -> Any:
    """The saved artifact loaded back from its folder, on `device`."""
    return load_compressed(folder).to(device)  # type: ignore[arg-type]  # (transformers types .to's first argument)


def _measure_streamed(model_dir: Path, folder: Path, before: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The artifact's numbers from its files: its size, its output cosine on the probe (`_streamed_cosine`), and the
    lowest and mean block output cosine. A model whose blocks cannot run this way (a multimodal model's vision
    blocks, an unusual block signature) leaves them unmeasured (null, with the reason) rather than failing a job
    whose artifact is already written."""
    after = {**before, "size_bytes": metrics.weights_size_bytes(folder)}
    return_freed_memory()  # what compression freed, before the measurements read blocks again
    try:
        before["output_cosine"], after["output_cosine"] = _streamed_cosine(model_dir, folder, device)
        cosines = block_output_cosines(model_dir, folder)
    except (TypeError, ValueError, RuntimeError, AttributeError, UnsupportedModel) as exc:
        log.warning("streamed measurements of %s not taken: %r", folder, exc)
        return {**after, "block_output_cosine_min": None, "block_output_cosine_mean": None,
                "block_output_cosine_error": f"{type(exc).__name__}: {exc}"}
    return {**after, "block_output_cosine_min": min(cosines, default=None),
            "block_output_cosine_mean": sum(cosines) / len(cosines) if cosines else None,
            "block_output_cosines": cosines}


def _streamed_cosine(model_dir: Path, folder: Path, device: torch.device) -> tuple[float, float]:
    """(original, artifact) output cosine on the probe, as `execute_job` measures a loaded model, with each model
    run forward one block in memory at a time (`streamed_model`)."""
    with streamed_model(model_dir, device) as original:
        probe = _probe(original, _tokenizer(model_dir))
    with streamed_model(folder, device) as artifact:
        after = probe.cosine(artifact)
    mask = probe.inputs.get("attention_mask")
    return metrics.output_cosine(probe.reference, probe.reference, mask), after


@contextmanager
def reading_input(what: str) -> Iterator[None]:
    """Errors raised while reading a stored input (a missing shard, a truncated or unparsable file) are faults of
    that input: they become `InputUnreadable`, which fails the job at once, instead of an infrastructure fault that
    would be retried until the attempts run out. Storage errors that may pass (EIO, ESTALE, ...) still retry."""
    try:
        yield
    except ServiceError:
        raise
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise
        raise InputUnreadable(f"{what} cannot be read: {exc}") from exc
    except (ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # out of memory is still named as such
        raise InputUnreadable(f"{what} cannot be read: {type(exc).__name__}: {exc}") from exc


def load_input(model_dir: Path, device: str | torch.device) -> Any:
    """The uploaded model folder loaded for a job (see `reading_input`)."""
    with reading_input("the uploaded model"):
        return load_model(model_dir, device)


def _export_onnx(model: Any, folder: Path, probe: "_Probe") -> dict[str, Any]:
    """Write the ONNX export beside the weights, weight-only integer layers as MatMulNBits with the artifact's own
    codes (`onnx_nbits`): a causal LM's decoder step with a KV cache (model_with_past.onnx, so a generation loop
    decodes one token per step; model.onnx without a cache if that export fails), any other model as model.onnx.
    It is checked in ONNX Runtime: the cosine of its outputs vs the original model's on the probe inputs (and for
    the KV-cache graph, whether its greedy tokens equal the torch artifact's) go into the job's metrics with its
    file, its size in bytes and what went out as MatMulNBits (with notes)."""
    from core.compression.artifact import read_manifest, stored_encodings
    from core.compression.exports.onnx_nbits import plan_nbits

    model = model.cpu()
    plan = plan_nbits(model, stored_encodings(folder), read_manifest(folder).aliases)
    notes, path = plan.notes(), None
    if model_kind(type(model).__name__) == "causal_lm":
        try:
            path = export_onnx_with_past(model, folder, plan)
        except RuntimeError as exc:
            notes.append(f"no KV-cache graph ({str(exc)[:300]}): model.onnx runs without a cache")
    try:
        path = path or export_onnx(model, folder, {k: v.cpu() for k, v in probe.inputs.items()}, plan)
    except (RuntimeError, ValueError) as exc:
        raise StepFailed(f"ONNX export failed: {exc}") from exc
    session = onnx_session(path, torch.get_num_threads())
    feeds = {i.name: probe.inputs[i.name].cpu().numpy() for i in session.get_inputs() if i.name in probe.inputs}
    outputs = torch.from_numpy(session.run(None, {**feeds, **empty_cache(session, len(probe.inputs["input_ids"]))})[0])
    cosine = metrics.output_cosine(probe.reference.cpu(), outputs, probe.inputs.get("attention_mask"))
    cached = path.name == CACHE_ONNX_FILE
    checked = {"greedy_tokens_match_torch": same_greedy(model, session, probe.inputs)} if cached else {}
    return {"onnx_output_cosine": cosine, "onnx_bytes": path.stat().st_size,
            "onnx": {"file": path.name, "file_bytes": path.stat().st_size, **checked, **plan.summary(),
                     "notes": notes}}


def _runtimes(spec: JobSpec, model_dir: Path, work_dir: Path, loaded: Any, tokenizer: PreTrainedTokenizerBase | None,
              probe: "_Probe", ctx: StepContext) -> dict[str, Any]:
    """The job's `runtimes` timed (`core.compression.runtimes`): one record per runtime, and the job's `notes`
    naming each runtime where the artifact is not faster or not smaller in memory."""
    ctx.report(0.975, f"timing on {', '.join(spec.runtimes)}")
    workload, inputs = workload_for(loaded, tokenizer, probe.inputs)
    models = RuntimeModels(load_input(model_dir, ctx.device), loaded.to(ctx.device), work_dir / "model", model_dir,
                           work_dir / "runtimes", workload, inputs)
    results = measure_runtimes(spec.runtimes, models)
    return {"runtimes": results, "notes": [note for record in results.values() for note in record["notes"]]}


def _export_compressed_tensors(folder: Path, probe: "_Probe", device: torch.device) -> dict[str, Any]:
    """Write the compressed-tensors folder inside the artifact and load it back with transformers' own loader: the
    cosine of its outputs vs the original model's, its format and the encoded weights it keeps as plain values
    go into the job's metrics."""
    from core.compression.exports.compressed_tensors import (
        CT_FOLDER,
        export_compressed_tensors,
        load_compressed_tensors,
    )

    try:
        export = export_compressed_tensors(folder, folder / CT_FOLDER)
    except (UnsupportedModel, RuntimeError) as exc:
        raise StepFailed(f"compressed-tensors export failed: {exc}") from exc
    loaded = load_compressed_tensors(export.folder).to(device)
    return {
        "compressed_tensors_output_cosine": probe.cosine(loaded),
        "compressed_tensors": {
            "format": export.format,
            "quantized_modules": export.quantized_modules,
            "plain_weights": export.dense_weights,
            "sparsity_structure": (export.sparsity or {}).get("sparsity_structure"),
        },
    }


def _export_gguf(folder: Path, loaded: Any, probe: "_Probe", device: torch.device) -> dict[str, Any]:
    """Write model.gguf beside the weights (every tensor checked bit for bit against the artifact's weights with the
    gguf package's own dequantizer) and load it back with transformers' GGUF loader: the cosine of its outputs vs
    the original model's and vs the artifact's, its tensor types and tokenizer go into the job's metrics."""
    from core.compression.exports.gguf import GGUF_FILE, export_gguf, load_gguf

    try:
        export = export_gguf(folder, folder / GGUF_FILE)
    except (UnsupportedModel, RuntimeError) as exc:
        raise StepFailed(f"GGUF export failed: {exc}") from exc
    theirs = load_gguf(export.path).to(device)  # type: ignore[arg-type]  # (transformers types .to's first argument)
    outputs = metrics.model_outputs(theirs, probe.inputs)
    mask = probe.inputs.get("attention_mask")
    return {
        "gguf_output_cosine": metrics.output_cosine(probe.reference, outputs, mask),
        "gguf": {
            "file_bytes": export.path.stat().st_size,
            "file_type": export.file_type,
            "tensor_types": export.tensor_types,
            "tensors_bit_exact": sum(export.tensor_types.values()),
            "artifact_output_cosine": metrics.output_cosine(metrics.model_outputs(loaded, probe.inputs), outputs, mask),
            "tokenizer": export.tokenizer,
            "notes": export.notes,
        },
    }


def _scaled(ctx: StepContext, low: float, high: float, work_dir: Path) -> StepContext:
    """The pipeline's progress covers [low, high] of the job; loading, saving and measuring take the rest."""

    def report(fraction: float, message: str) -> None:
        ctx.report(low + (high - low) * fraction, message)

    return dataclasses.replace(ctx, report=report, work_dir=work_dir / "steps")


def _with_teacher(ctx: StepContext, model_dir: Path) -> StepContext:
    """Teacher "original" is the uploaded folder loaded afresh; other refs go to the caller's resolver."""

    def teacher(ref: str) -> Any:
        return load_input(model_dir, ctx.device) if ref == "original" else ctx.teacher(ref)

    return dataclasses.replace(ctx, teacher=teacher)


def _tokenizer(model_dir: Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer; None without tokenizer files (the probe then uses seeded random token ids). Files
    that are there but do not load are a broken input, never silently replaced by random ids."""
    with reading_input("the uploaded tokenizer"):
        tokenizer = load_tokenizer(model_dir, read_model_config(model_dir))
    if tokenizer is None:
        log.info("no tokenizer in %s; probing with random token ids", model_dir)
    return tokenizer


def _probe(model: Any, tokenizer: PreTrainedTokenizerBase | None) -> _Probe:
    inputs = metrics.probe_inputs(model, tokenizer)
    return _Probe(inputs, metrics.model_outputs(model, inputs))


def _measure(model: Any, probe: _Probe, size_bytes: int) -> dict[str, float | int]:
    return {
        "size_bytes": size_bytes,
        "parameters": metrics.count_parameters(model),
        "output_cosine": probe.cosine(model),
    }


def _summary(before: dict, after: dict, archive: Path, ctx: StepContext) -> dict[str, Any]:
    return {
        "before": before,
        "after": after,
        "size_ratio": round(after["size_bytes"] / before["size_bytes"], 4),
        "speedup": _speedup(before["latency_ms"], after["latency_ms"]),
        "output_cosine": after["output_cosine"],
        "artifact_bytes": archive.stat().st_size,
        "bytes": byte_breakdown(archive.parent / "model"),  # the folder `_zip_folder` zipped
        "device": str(ctx.device),
        "note": "after = the saved artifact loaded back with core.load_compressed; cosine vs the original outputs "
                "on fixed probe inputs; latency = median forward of the probe batch, original and artifact "
                "timed in alternating rounds",
    }


def _speedup(before_ms: float | None, after_ms: float | None) -> float | None:
    """None when latency was not measured (layer-by-layer jobs)."""
    if before_ms is None or after_ms is None:
        return None
    return round(before_ms / after_ms, 3)


def _manifest(spec: JobSpec, reports: list[StepReport], before: dict, provenance: dict) -> dict[str, Any]:
    steps = [
        {"config": step.model_dump(mode="json"), "metrics": report.metrics, "notes": report.notes}
        for step, report in zip(spec.steps, reports, strict=True)
    ]
    return {**provenance, "steps": steps, "original": before}


def _zip_folder(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(folder).as_posix())
    return target


