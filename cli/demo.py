"""`mcs demo`: the main job end to end, as a user would run it.

Starts the embedded stack (SQLite database, SQLite broker, local artifacts: no server to install) unless an API
URL is given, uploads the real all-MiniLM-L6-v2, runs an int8 job on a real Celery worker, downloads the artifact,
loads it with `core.load_compressed` and prints a before/after table measured here on real review sentences.
"""

import sys
import tempfile
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import transformers

from cli.stack import local_stack
from client import Client, Job, Lines
from core.service.settings import get_settings

RECIPE = {"steps": [{"type": "quantize", "method": "rtn", "bits": 8, "granularity": "per_channel",
                     "symmetric": True, "exclude": []}]}
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json")


def run_demo(api_url: str | None, api_key: str | None) -> int:
    transformers.logging.disable_progress_bar()
    with ExitStack() as stack:
        if api_url is None:
            api_url = stack.enter_context(_embedded_stack())
        client = stack.enter_context(Client(api_url, api_key or create_key(), timeout=120))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcs-demo-")))
        source = _minilm_folder()
        job = _submit(client, _zip_model(source, work / "all-MiniLM-L6-v2.zip"))
        if job.status != "succeeded":
            reason = f"{job.error.code}: {job.error.message}" if job.error else "no error recorded"
            print(f"job {job.id} ended {job.status}: {reason}", file=sys.stderr)
            return 1
        artifact = job.download(work / "artifact.zip", progress=False)
        print(f"downloaded {job.artifacts[0].name} ({artifact.stat().st_size / 1e6:.1f} MB, sha256 verified)")
        _print_table(source, artifact, job)
    return 0


def _embedded_stack():
    """Migrate, then run the API and a Celery worker as child processes on the embedded default."""
    from core.service.db.migrate import upgrade

    get_settings().var_dir.mkdir(parents=True, exist_ok=True)  # the embedded SQLite files live there
    upgrade(get_settings().database_url)
    log_dir = get_settings().var_dir / "logs"
    print(f"starting the API and a Celery worker (logs in {log_dir})", flush=True)
    return local_stack({}, log_dir)


def create_key() -> str:
    from core.service.db.repositories import Tenants
    from core.service.db.session import session_scope

    with session_scope() as session:
        tenants = Tenants(session)
        return tenants.create_api_key(tenants.get_or_create("demo"))


def _minilm_folder() -> Path:
    from core.compression.shipped import minilm_folder

    return minilm_folder()


def _zip_model(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as zf:
        for name in MODEL_FILES:
            if (folder / name).exists():
                zf.write(folder / name, f"all-MiniLM-L6-v2/{name}")
    return target


def _submit(client: Client, archive: Path) -> Job:
    model = client.models.upload(archive, name="all-MiniLM-L6-v2", progress=False)
    print(f"uploaded {model.name}: {model.architecture}, {model.num_parameters:,} parameters, "
          f"{model.size_bytes / 1e6:.1f} MB of weights (id {model.id})")
    job = client.jobs.submit(model, RECIPE)
    print(f"job {job.id} queued: {RECIPE['steps'][0]}")
    return job.wait(progress=Lines(sys.stdout))


def checked_json(response: httpx.Response) -> dict[str, Any]:
    """The JSON of a successful response (bench/gpu_worker.py still speaks raw HTTP)."""
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url} -> {response.status_code}: "
                           f"{response.text}")
    return response.json()


def _print_table(source: Path, artifact: Path, job: Job) -> None:
    from core import load_compressed
    from core.compression.metrics import weights_size_bytes
    from core.compression.shipped import measure

    with tempfile.TemporaryDirectory(prefix="mcs-demo-artifact-") as tmp:
        with zipfile.ZipFile(artifact) as zf:
            zf.extract("model.safetensors", tmp)
        size = weights_size_bytes(Path(tmp))
    print("\nmeasuring both models here (200 review sentences; batch 8 x 128 tokens, 2 threads, interleaved) ...")
    before, after = measure(source, [("int8 artifact", load_compressed(artifact), size)])
    rows = [("weights file (MB)", before.size_bytes / 1e6, after.size_bytes / 1e6, ".1f"),
            ("parameters", before.parameters, after.parameters, ",d"),
            ("embedding cosine vs fp32", before.cosine_mean, after.cosine_mean, ".4f"),
            ("  (minimum over sentences)", before.cosine_min, after.cosine_min, ".4f"),
            ("CPU latency (ms)", before.latency_ms, after.latency_ms, ".1f")]
    print("\nall-MiniLM-L6-v2, before -> after (downloaded artifact loaded with core.load_compressed)")
    print(f"{'':<30}{'original':>12}{'int8 artifact':>16}{'after/before':>14}")
    for label, old, new, fmt in rows:
        print(f"{label:<30}{format(old, fmt):>12}{format(new, fmt):>16}{new / old:>14.3f}")
    service = job.metrics or {}
    print(f"\nthe service's own numbers for job {job.id}: size ratio {service['size_ratio']}, "
          f"output cosine {service['output_cosine']:.4f}, speedup {service['speedup']}x (probe inputs)")
