"""Peak memory of the layer-by-layer engine (core/compression/sequential.py) on a synthetic Llama of the TinyLlama
1.1B shape, stored as bf16 shards, against its bf16 weight bytes; and both engines side by side on a 6-layer model
of the same widths, small enough for the in-memory path.

Each compression runs in a child process whose resident memory (summed over its process tree) is sampled every
50 ms; the models are written tensor by tensor, never materialised whole. Random weights: memory and speed only,
never quality (see docs/DATA.md).

Run: `.venv/bin/python -m bench.big_models`. Writes its section of docs/benchmarks.md. `--7b`: the 7B shape through
the layer-by-layer engine alone. `--api-7b [--layers N] [--stream-above-bytes B] [--put-mib M] [--out FILE]`: a whole
7B job through the HTTP API of the embedded stack (chunked upload, job, download, a block-by-block check of the
artifact in a separate process); only the full 32 layers write its section (of FILE, docs/benchmarks.md by default).
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from bench.report import BENCHMARKS_DOC, load_average, machine_description, markdown_table, update_section
from cli.stack import stop_processes

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
    return measured_child([sys.executable, "-m", f"bench.{NAME}", "--child", engine, str(source), str(out)], engine)


def measured_child(command: list[str], label: str) -> dict[str, Any]:
    """Run `command`; the JSON object of its last output line plus the peak RSS of its process tree."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(child.pid))
        time.sleep(SAMPLE_S)
    stdout = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        raise RuntimeError(f"{label} child failed with {child.returncode}")
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


# --- `--api-7b`: a whole job through the HTTP API of the embedded stack (issue 17) ---

GiB = 1024**3
# One read of a streamed request body: the client holds one piece at a time, so its memory stays flat.
UPLOAD_PIECE = 16 * 1024**2
# One PUT of a file (`--put-mib`): 256 MiB makes ~54 requests for the 7B folder, far under the API's rate limit
# (600 a minute, bursts of 60), which 16 MiB requests at 200 MB/s (750 a minute) would trip.
PUT_MIB = 256
POLL_S = 0.5
VERIFY_SEED = 1
# The targets.
API_GROWTH_TARGET = 64e6
UPLOAD_TARGET_MB_S = 200
WORKER_PEAK_TARGET = 3e9
COSINE_TARGET = 0.999
# Source shards, the uploaded copy (moved into storage), the job's int4 folder and zip, the stored artifact, the
# download and its extraction: about 2 + 4 x 0.27 of the bf16 bytes; 3.5 leaves a margin.
DISK_PER_BF16 = 3.5


class PeakSampler:
    """The resident memory of a process tree (a process and all its children, summed), sampled every SAMPLE_S in a
    thread while the `with` block runs: `first` is the sample taken on entry, `peak` the highest, `peak_at` when
    (seconds after entry)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first = self.peak = tree_rss(pid)
        self.peak_at = 0.0
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def _sample(self) -> None:
        rss = tree_rss(self.pid)
        if rss > self.peak:
            self.peak, self.peak_at = rss, time.perf_counter() - self._start

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@contextmanager
def embedded_service(var: Path, stream_above_bytes: int) -> Iterator[dict[str, Any]]:
    """Migrate, create an API key and start `mcs serve` and `mcs worker --concurrency 1` as child processes on the
    embedded default (SQLite database and broker, artifacts under `var`), as the README's commands do; yields the
    URL, the key and both processes, and stops them on exit, whatever happened."""
    from cli.stack import free_port, spawn, wait_ready

    inherited = {name: value for name, value in os.environ.items() if not name.startswith("MCS_")}  # defaults
    env = {**inherited, "MCS_VAR_DIR": str(var), "MCS_DATABASE_URL": "", "MCS_BROKER_URL": "",
           "MCS_ARTIFACT_DIR": str(var / "artifacts"), "MCS_STREAM_ABOVE_BYTES": str(stream_above_bytes),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    mcs = [sys.executable, "-m", "cli.main"]
    subprocess.run([*mcs, "migrate"], env=env, check=True, capture_output=True)
    keys = subprocess.run([*mcs, "keys", "create", "--tenant", "bench"], env=env, check=True, capture_output=True,
                          text=True)
    port = free_port()
    (var / "logs").mkdir(parents=True, exist_ok=True)
    processes = {"api": spawn([*mcs, "serve", "--port", str(port)], env, var / "logs" / "api.log"),
                 "worker": spawn([*mcs, "worker", "--queues", "cpu", "--concurrency", "1"], env,
                                 var / "logs" / "worker.log")}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, list(processes.values()))
        yield {"url": url, "key": keys.stdout.strip().splitlines()[-1], **processes}
    except BaseException:
        print_log_tails(var / "logs")  # the temp folder, logs included, is gone once this run ends
        raise
    finally:
        stop_processes(list(processes.values()))


def print_log_tails(logs: Path, lines: int = 40) -> None:
    for log in sorted(logs.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- last {len(tail)} lines of {log.name} ---", *tail, sep="\n", file=sys.stderr)


def folder_manifest(folder: Path) -> list[dict[str, Any]]:
    """The upload manifest: each file's name, size and sha256, hashed in a pass of its own after the folder was
    written (so the hashing time is not upload time)."""
    return [{"path": file.name, "size": file.stat().st_size, "sha256": file_sha256(file)}
            for file in sorted(folder.iterdir())]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(UPLOAD_PIECE):
            digest.update(piece)
    return digest.hexdigest()


def file_pieces(path: Path, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of `path`, UPLOAD_PIECE at a time."""
    with path.open("rb") as handle:
        handle.seek(start)
        while start < end:
            piece = handle.read(min(UPLOAD_PIECE, end - start))
            start += len(piece)
            yield piece


def put_file(client: httpx.Client, upload_id: str, path: Path, size: int, put_bytes: int) -> None:
    """PUT one file in requests of `put_bytes`, each a streamed body with its Content-Range."""
    for start in range(0, size, put_bytes):
        end = min(size, start + put_bytes)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(end - start),
                   "Content-Range": f"bytes {start}-{end - 1}/{size}"}
        response = client.put(f"/v1/uploads/{upload_id}/files/{path.name}", content=file_pieces(path, start, end),
                              headers=headers)
        checked(response)
    if not response.json()["complete"]:
        raise RuntimeError(f"{path.name} is not complete after its last PUT: {response.text}")


def checked(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                           f"{response.text[:2000]}")
    return response.json()


def upload_model(client: httpx.Client, folder: Path, manifest: list[dict[str, Any]], api_pid: int,
                 put_bytes: int) -> dict[str, Any]:
    """The chunked upload of `folder` (create, PUT each file, complete) with the API process tree's RSS sampled
    from just before the first PUT to the end of complete; the model and the numbers."""
    upload = checked(client.post("/v1/uploads", json={"name": "llama-7b-shape", "files": manifest}))
    with PeakSampler(api_pid) as puts_rss:
        start = time.perf_counter()
        for entry in manifest:
            put_file(client, upload["id"], folder / entry["path"], entry["size"], put_bytes)
        puts_done = time.perf_counter()
    # Completion validates the folder on the meta device: its first run imports torch and transformers into the
    # API process, a one-off step in RSS that says nothing about the bytes streamed, so it is reported apart.
    with PeakSampler(api_pid) as complete_rss:
        model = checked(client.post(f"/v1/uploads/{upload['id']}/complete"))
        done = time.perf_counter()
    total = sum(entry["size"] for entry in manifest)
    return {"model": model, "bytes": total, "put_bytes": put_bytes, "put_s": puts_done - start,
            "complete_s": done - puts_done, "mb_s": total / (done - start) / 1e6, "api_rss_before": puts_rss.first,
            "api_rss_peak": puts_rss.peak, "api_rss_complete": complete_rss.peak}


def run_job(client: httpx.Client, model_id: str, worker_pid: int) -> dict[str, Any]:
    """Submit the rtn job and poll until it ends, with the worker process tree's RSS sampled throughout."""
    with PeakSampler(worker_pid) as worker_rss:
        start = time.perf_counter()
        job = checked(client.post("/v1/jobs", json={"model_id": model_id, "steps": [STEP]}))
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(POLL_S)
            job = checked(client.get(f"/v1/jobs/{job['id']}"))
        wall = time.perf_counter() - start
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['status']}: {job['error']}")
    return {"job": job, "wall_s": wall, "worker_rss_before": worker_rss.first, "worker_rss_peak": worker_rss.peak,
            "worker_peak_at": worker_rss.peak_at}


def download_artifact(client: httpx.Client, artifact: dict[str, Any], target: Path) -> Path:
    """Stream the artifact's zip to disk (sha256 checked), extract it into `target` and drop the zip."""
    archive = target.with_suffix(".zip")
    digest = hashlib.sha256()
    with client.stream("GET", f"/v1/artifacts/{artifact['id']}") as response, archive.open("wb") as out:
        response.raise_for_status()
        for piece in response.iter_bytes(UPLOAD_PIECE):
            digest.update(piece)
            out.write(piece)
    if digest.hexdigest() != artifact["sha256"]:
        raise RuntimeError(f"artifact {artifact['id']} does not match its sha256")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(target)
    archive.unlink()
    return target


def verify_in_child(source: Path, artifact: Path) -> dict[str, Any]:
    """`verify_blocks` in a separate process (none of the service's state), with its tree's peak RSS."""
    child = subprocess.Popen([sys.executable, "-m", f"bench.{NAME}", "--verify", str(source), str(artifact)],
                             stdout=subprocess.PIPE, text=True)
    with PeakSampler(child.pid) as rss:
        stdout, _ = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the verification child failed with {child.returncode}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss": rss.peak}


def verify_blocks(source: Path, artifact: Path) -> dict[str, Any]:
    """Each decoder block of the artifact (its encoded weights decoded) against the same block of the source with
    the rtn encoding simulated here (`TENSOR_ENCODERS` then `decode` on each selected weight, whole tensors rather
    than the engine's row chunks), on one seeded random hidden state: the cosine of what each block adds to its
    input, and how many decoded weights are bit-identical to the simulated ones. One block in memory at a time:
    the whole model in float32 (27 GB at 7B) would not fit."""
    from core.compression import metrics
    from core.compression.artifact import read_manifest
    from core.compression.modelio import meta_model, model_class_for, read_model_config
    from core.compression.sequential import (
        _block_arguments,
        _numbered_blocks,
        _run_block,
        _stored_tensors,
        artifact_tensors,
    )
    from core.compression.spec import JobSpec

    torch.set_num_threads(THREADS)
    step = JobSpec(steps=[STEP]).steps[0]
    config = read_model_config(source)
    model = meta_model(model_class_for(config), config)
    original, compressed = tensor_files(source), tensor_files(artifact)
    encodings = read_manifest(artifact).encodings
    selected = selected_names(model, step)
    hidden = torch.randn(2, 64, model.config.hidden_size, generator=torch.Generator().manual_seed(VERIFY_SEED))
    extra = _block_arguments(model, hidden)
    cosines, identical, compared = [], 0, 0
    for prefix in _numbered_blocks(model):
        block = model.get_submodule(prefix)
        names = [f"{prefix}.{name}" for name in block.state_dict()]
        reference = simulated(_stored_tensors(names, original), selected, step)
        candidate = artifact_tensors(names, compressed, encodings)
        identical += sum(torch.equal(reference[name], candidate[name]) for name in names if name in selected)
        compared += sum(name in selected for name in names)
        outputs = [_run_block(block, prefix, tensors, hidden, extra) for tensors in (reference, candidate)]
        cosines.append(metrics.output_cosine(outputs[0] - hidden, outputs[1] - hidden))
    return {"blocks": len(cosines), "cosine_min": min(cosines), "cosine_mean": sum(cosines) / len(cosines),
            "weights_identical": identical, "weights_compared": compared}


def tensor_files(folder: Path) -> dict[str, Path]:
    """Each tensor name of the folder's safetensors files, mapped to its file (headers only)."""
    from safetensors import safe_open

    files = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            files.update(dict.fromkeys(handle.keys(), file))
    return files


def selected_names(model: Any, step: Any) -> set[str]:
    from core.compression.quant.weights import selected_weights

    return {shared.name for shared in selected_weights(model, step)}


def simulated(tensors: dict[str, torch.Tensor], selected: set[str], step: Any) -> dict[str, torch.Tensor]:
    """`tensors` with each selected weight replaced by what the engine's encoding of it decodes to."""
    from core.compression.encoding import decode
    from core.compression.sequential import TENSOR_ENCODERS

    encoder = TENSOR_ENCODERS[type(step)]
    return {name: decode(encoder(step, tensor.float())) if name in selected else tensor
            for name, tensor in tensors.items()}


def run_api_job(tmp: Path, layers: int, stream_above_bytes: int, put_bytes: int) -> dict[str, Any]:
    """Build the folder, then upload, job, download and verification through a fresh embedded stack."""
    params = write_synthetic_llama(tmp / "source", layers, SEVEN_B)
    check_disk(tmp, params * 2)
    start = time.perf_counter()
    manifest = folder_manifest(tmp / "source")
    numbers: dict[str, Any] = {"params": params, "hash_s": time.perf_counter() - start}
    print(f"built and hashed {params / 1e9:.2f} B params in {len(manifest)} files", flush=True)
    with embedded_service(tmp / "var", stream_above_bytes) as service, httpx.Client(
            base_url=service["url"], timeout=httpx.Timeout(600), headers={"Authorization": f"Bearer {service['key']}"}
    ) as client:
        numbers.update(upload_model(client, tmp / "source", manifest, service["api"].pid, put_bytes))
        print(f"uploaded: {numbers['mb_s']:.0f} MB/s", flush=True)
        numbers.update(run_job(client, numbers["model"]["id"], service["worker"].pid))
        print(f"job {numbers['job']['id']} succeeded in {numbers['wall_s']:.0f} s", flush=True)
        start = time.perf_counter()
        artifact = download_artifact(client, numbers["job"]["artifacts"][0], tmp / "artifact")
        numbers["download_s"] = time.perf_counter() - start
    print(f"downloaded and extracted the artifact in {numbers['download_s']:.0f} s; checking it block by block",
          flush=True)
    start = time.perf_counter()
    numbers["verify"] = {**verify_in_child(tmp / "source", artifact), "seconds": time.perf_counter() - start}
    return numbers


def check_disk(tmp: Path, bf16_bytes: int) -> None:
    free = shutil.disk_usage(tmp).free
    if free < DISK_PER_BF16 * bf16_bytes:
        raise RuntimeError(f"{tmp} has {free / 1e9:.0f} GB free; this run needs about "
                           f"{DISK_PER_BF16 * bf16_bytes / 1e9:.0f} GB")


def target(value: float, limit: float, above: bool = False) -> str:
    met = value >= limit if above else value <= limit
    return "met" if met else "MISSED"


def api_table(n: dict[str, Any]) -> str:
    bf16 = n["params"] * 2
    growth = n["api_rss_peak"] - n["api_rss_before"]
    after = n["job"]["metrics"]["after"]
    cosine = n["verify"]["cosine_min"]
    rows = [
        ["bf16 GB", f"{bf16 / 1e9:.2f}", ""],
        ["upload MB/s (PUTs + complete)", f"{n['mb_s']:.0f}", f"≥ {UPLOAD_TARGET_MB_S}: "
         f"{target(n['mb_s'], UPLOAD_TARGET_MB_S, above=True)}"],
        ["PUTs s / complete s", f"{n['put_s']:.1f} / {n['complete_s']:.1f}", ""],
        ["API RSS before upload / growth during the PUTs MB", f"{n['api_rss_before'] / 1e6:.0f} / "
         f"{growth / 1e6:.0f}", f"growth ≤ {API_GROWTH_TARGET / 1e6:.0f}: {target(growth, API_GROWTH_TARGET)}"],
        ["API RSS peak during complete MB", f"{n['api_rss_complete'] / 1e6:.0f}", ""],
        ["worker RSS idle / peak GB", f"{n['worker_rss_before'] / 1e9:.2f} / {n['worker_rss_peak'] / 1e9:.2f}",
         f"peak ≤ {WORKER_PEAK_TARGET / 1e9:.0f}: {target(n['worker_rss_peak'], WORKER_PEAK_TARGET)}"],
        ["worker peak reached, s after submission", f"{n['worker_peak_at']:.1f}", ""],
        ["worker peak / bf16", f"{n['worker_rss_peak'] / bf16:.2f}x", ""],
        ["job wall s (submit to seen ended)", f"{n['wall_s']:.1f}", "status succeeded: met"],
        ["job engine / size ratio", f"{n['job']['metrics'].get('engine')} / "
         f"{after['size_bytes'] / n['job']['metrics']['before']['size_bytes']:.3f}", ""],
        ["job block_output_cosine min / mean (vs bf16)",
         f"{after['block_output_cosine_min']:.5f} / {after['block_output_cosine_mean']:.5f}", ""],
        ["block cosine min vs separate-process reference", f"{cosine:.6f}",
         f"≥ {COSINE_TARGET}: {target(cosine, COSINE_TARGET, above=True)}"],
        ["decoded weights bit-identical to the reference",
         f"{n['verify']['weights_identical']} / {n['verify']['weights_compared']}", ""],
        ["download + unzip s / block check s", f"{n['download_s']:.0f} / {n['verify']['seconds']:.0f}", ""],
    ]
    return markdown_table(["measure", "value", "target"], rows)


def estimate_line(job: dict[str, Any]) -> str:
    estimate = job.get("estimate")
    if not estimate:
        return "no pre-flight estimate in the job JSON"
    return (f"{estimate['engine']} engine, peak host {estimate['peak_host_bytes'] / 1e9:.2f} GB, "
            f"{estimate['seconds']:.0f} s, time limits {estimate['soft_time_limit_s']} / "
            f"{estimate['hard_time_limit_s']} s")


def api_body(n: dict[str, Any], layers: int, stream_above_bytes: int) -> str:
    shape = "Llama-2-7B's shape" if layers == SEVEN_B["num_hidden_layers"] else f"Llama-2-7B's widths, {layers} layers"
    return f"""## Big models: a whole 7B job through the API

Reproduce: `{COMMAND} --api-7b` (it must run alone on the machine: the upload and the job are timed)

Machine: {machine_description()}; load average when it ended: {load_average()}.

A synthetic Llama of {shape} (hidden 4096, intermediate 11008, 32 heads, vocab 32000, untied head; random bf16
weights in {SHARD_BYTES / 2**30:.0f} GiB shards) through the real processes of the embedded stack (`mcs serve` and
`mcs worker --concurrency 1` on SQLite and the SQLite broker, artifacts on local disk, a fresh MCS_VAR_DIR,
MCS_STREAM_ABOVE_BYTES={stream_above_bytes}, other settings at their defaults): a chunked upload (`/v1/uploads`,
each file PUT in {n['put_bytes'] // 2**20} MiB requests streamed from disk {UPLOAD_PIECE // 2**20} MiB at a time; the
manifest's sha256 were computed in a pass of their own before, {n['hash_s']:.0f} s, not counted), the job
`{STEP}`, the download of its artifact. RSS is that of a process tree (the process and its children, summed), sampled
every {SAMPLE_S * 1000:.0f} ms: the API's from just before the first PUT to the end of complete, the worker's (its main
process and its pool child) from the submission to the end of the job. The job's pre-flight estimate:
{estimate_line(n['job'])}.

The artifact is checked in a separate process, block by block: each decoder block with the artifact's decoded
weights against the same block of the source with rtn int4 g128 simulated on its weights (`TENSOR_ENCODERS` +
`decode`, whole tensors), on a seeded random hidden state (cosine of what the block adds to its input; peak RSS of
that process {n['verify']['peak_rss'] / 1e9:.2f} GB). Whole-model `core.load_compressed` is not run: 6.7 B parameters
in float32 need 27 GB, more than this machine has. The job's own block cosines compare against the bf16 source,
so they show rtn's error on random weights, not a defect.

{api_table(n)}
"""


def main_api_7b(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{COMMAND} --api-7b")
    parser.add_argument("--layers", type=int, default=SEVEN_B["num_hidden_layers"],
                        help="decoder blocks (fewer for a quick run; only the full 32 write docs/benchmarks.md)")
    parser.add_argument("--stream-above-bytes", type=int, default=2 * GiB,
                        help="MCS_STREAM_ABOVE_BYTES; lower it (e.g. 0) so a small run still goes layer by layer")
    parser.add_argument("--put-mib", type=int, default=PUT_MIB, help="bytes of one PUT request, in MiB")
    parser.add_argument("--out", type=Path, default=BENCHMARKS_DOC,
                        help="the markdown file whose section it writes (a copy to review instead of the docs)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mcs-big-api-") as tmp:
        numbers = run_api_job(Path(tmp), args.layers, args.stream_above_bytes, args.put_mib * 2**20)
    body = api_body(numbers, args.layers, args.stream_above_bytes)
    if args.layers == SEVEN_B["num_hidden_layers"]:
        update_section(f"{NAME}_api_7b", body, args.out)
    else:
        print(f"({args.layers} layers: docs/benchmarks.md left as it is; only the full 7B shape writes it)")
    print(body)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        run_child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        sys.exit(0)
    if len(sys.argv) == 4 and sys.argv[1] == "--verify":
        print(json.dumps(verify_blocks(Path(sys.argv[2]), Path(sys.argv[3]))))
        sys.exit(0)
    if sys.argv[1:] == ["--7b"]:
        sys.exit(main_7b())
    if sys.argv[1:2] == ["--api-7b"]:
        sys.exit(main_api_7b(sys.argv[2:]))
    sys.exit(main())
