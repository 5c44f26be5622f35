"""Many pollers against one real API process on PostgreSQL. Sync dependencies once deadlocked it: every threadpool
thread waited for a pooled connection while the requests holding the connections waited for a thread to go on
(64 pollers completed 0 requests in 8 s, then failed with `QueuePool limit ... reached`)."""

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cli.stack import free_port, spawn, wait_ready
from core.service.db.models import new_id
from core.service.db.repositories import Jobs, Models, Tenants
from core.service.db.session import session_scope

pytestmark = pytest.mark.safety
CLIENTS = 64
DURATION_S = 10.0
MIN_COMPLETED = 2 * CLIENTS  # 30-85 req/s here on two loaded cores; the deadlock completed none
# Generous: with client and server sharing two loaded cores, the slowest poll took ~6 s (waiting for CPU: inside the
# app the slowest took 0.7 s); the deadlock answered nothing at all.
POLL_TIMEOUT_S = 15


@pytest.fixture()
def server(db: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`mcs serve` on the suite's PostgreSQL, its rate limit through Redis set too high to refuse anyone."""
    env = {**os.environ, "MCS_RATE_LIMIT_PER_MINUTE": "60000000", "MCS_RATE_LIMIT_BURST": "1000000"}
    port, log = free_port(), tmp_path / "api.log"
    process = spawn([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env, log)
    try:
        wait_ready(f"http://127.0.0.1:{port}", [process])
        yield f"http://127.0.0.1:{port}", log
    finally:
        process.terminate()
        process.wait(timeout=30)


def one_job() -> tuple[str, str]:
    """A tenant's key and one queued job of theirs, written straight through the repositories."""
    with session_scope() as session:
        tenants = Tenants(session)
        tenant = tenants.get_or_create("pollers")
        key = tenants.create_api_key(tenant)
        model = Models(session, tenant.id).add(id=new_id("mdl"), name="m", architecture="BertModel",
                                               model_type="bert", num_parameters=1, size_bytes=1, sha256="0" * 64,
                                               storage_key="models/none")
        return key, Jobs(session, tenant.id).add_job(model.id, {"steps": [{"type": "quantize"}]}, "cpu", None,
                                                     None).id


async def poll(client: httpx.AsyncClient, path: str, deadline: float, results: list) -> None:
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            status = (await client.get(path)).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        results.append((status, time.monotonic() - started))


async def load(url: str, key: str, job_id: str) -> list[tuple[int | str, float]]:
    results: list[tuple[int | str, float]] = []
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=POLL_TIMEOUT_S) as client:
        deadline = time.monotonic() + DURATION_S
        await asyncio.gather(*(poll(client, f"/v1/jobs/{job_id}", deadline, results) for _ in range(CLIENTS)))
    return results


def test_64_pollers_on_one_api_process_all_get_answers(server):
    url, log = server
    key, job_id = one_job()
    results = asyncio.run(load(url, key, job_id))
    statuses = [status for status, _ in results]
    seconds = sorted(seconds for _, seconds in results)
    print(f"\n{len(results)} requests in {DURATION_S:.0f} s: {len(results) / DURATION_S:.0f} req/s, "
          f"p50 {statistics.median(seconds) * 1000:.0f} ms, max {seconds[-1] * 1000:.0f} ms, "
          f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert "QueuePool limit" not in log.read_text(), log.read_text()[-3000:]
    assert len(results) >= MIN_COMPLETED
