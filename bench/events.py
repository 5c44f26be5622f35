"""Event delivery lag on a live stack: worker progress → SSE client (p50, p99) and job event → webhook receiver
(p50). The issue's targets: SSE p50 ≤ 100 ms and p99 ≤ 500 ms on Redis; webhook p50 ≤ 1 s.

`python -m bench.events --jobs 20 --out events.json` starts uvicorn (2 processes) and a Celery worker on the
database and Redis of MCS_DATABASE_URL / MCS_BROKER_URL (PostgreSQL + Redis; migrated first) with a second
worker for the `webhooks` queue, runs `--jobs` small
distillation jobs (they report progress every second for several seconds) one after another while an SSE client
and a local webhook receiver listen, and prints the percentiles. The lag of an event is the time it reached the
client minus its `created_at` in the `job_events` table (one host, one clock).
"""

import argparse
import json
import os
import shutil
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cli.stack import free_port, spawn, stop_processes, wait_ready

STEP = {"type": "distill", "max_steps": 8, "batch_size": 2, "seq_len": 32}


def receiver() -> tuple[ThreadingHTTPServer, list[tuple[float, dict[str, Any]]]]:
    arrivals: list[tuple[float, dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            arrivals.append((time.time(), json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, arrivals


def created_at(database_url: str, job_id: str) -> dict[int, float]:
    from sqlalchemy import select

    from core.service.db.models import JobEvent
    from core.service.db.session import make_engine

    engine = make_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(select(JobEvent.seq, JobEvent.created_at).where(JobEvent.job_id == job_id)).all()
    engine.dispose()
    return {seq: at.timestamp() for seq, at in rows}


def follow(api: httpx.Client, job_id: str) -> dict[int, float]:
    """Arrival time of each event of the job's stream, by id."""
    arrivals, seq = {}, None
    with api.stream("GET", f"/v1/jobs/{job_id}/events", timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("id:"):
                seq = int(line[3:])
            elif line.startswith("event:") and seq is not None:
                arrivals[seq] = time.time()
    return arrivals


def run(api: httpx.Client, database_url: str, model_zip: bytes, jobs: int, hook_url: str) -> dict[str, Any]:
    created = api.post("/v1/webhooks", json={"url": hook_url, "events": ["progress", "done"]})
    created.raise_for_status()
    model = api.post("/v1/models", files={"file": ("m.zip", model_zip, "application/zip")}).json()
    sse_lags: list[float] = []
    for _ in range(jobs):
        job = api.post("/v1/jobs", json={"model_id": model["id"], "steps": [STEP]}).json()
        arrivals = follow(api, job["id"])
        made = created_at(database_url, job["id"])
        sse_lags += [arrivals[seq] - made[seq] for seq in arrivals if seq in made and seq > 1]
    return {"sse_lags": sse_lags, "jobs": jobs}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ms = np.array(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from core.service.db.migrate import upgrade
    from core.service.settings import get_settings
    from tests.fixtures.api import zip_folder
    from tests.fixtures.services import create_key
    from tests.models import save_model_folder, tiny_bert, tiny_tokenizer

    settings = get_settings()
    upgrade(settings.database_url)
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"mcs-bench-events-{os.getpid()}"
    folder = save_model_folder(tiny_bert(), root / "model")
    tiny_tokenizer().save_pretrained(folder)
    server, hooks = receiver()
    port = free_port()
    env = {**os.environ, "MCS_WEBHOOK_ALLOW_PRIVATE": "true", "MCS_ARTIFACT_DIR": str(root / "artifacts"),
           "MCS_RATE_LIMIT_PER_MINUTE": "0", "PYTHONUNBUFFERED": "1"}
    processes = [
        spawn([sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port), "--workers", "2"], env,
              root / "api.log"),
        spawn([sys.executable, "-m", "cli.main", "worker", "--queues", "cpu"], env, root / "worker.log"),
        # the deployment the README recommends for prompt deliveries while the job worker is busy
        spawn([sys.executable, "-m", "cli.main", "worker", "--queues", "webhooks", "--concurrency", "2"], env,
              root / "webhooks.log"),
    ]
    try:
        wait_ready(f"http://127.0.0.1:{port}", processes)
        key = create_key(settings.database_url, "bench-events")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                          timeout=60) as api:
            result = run(api, settings.database_url, zip_folder(folder), args.jobs,
                         f"http://127.0.0.1:{server.server_port}/hook")
        time.sleep(2)  # the last deliveries
    finally:
        stop_processes(processes)
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    hook_lags = [at - datetime.fromisoformat(payload["timestamp"]).timestamp() for at, payload in hooks]
    summary = {"jobs": args.jobs, "sse": percentiles(result["sse_lags"]), "webhook": percentiles(hook_lags)}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
