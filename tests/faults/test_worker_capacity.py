"""A real worker reports its capacity (the heartbeat submission reads: RAM, queues, runtimes) at start and on every
sweep."""

import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.compression.runtime_rules import installed_runtimes
from core.service.db.models import Worker
from core.service.db.session import make_engine

pytestmark = pytest.mark.faults


def worker_rows(url: str) -> list[Worker]:
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(Worker)))
    finally:
        engine.dispose()


def test_a_started_worker_reports_its_ram_and_queues_then_beats(stack):
    services = stack()
    services.start_worker()
    url = services.env["MCS_DATABASE_URL"]
    deadline = time.monotonic() + 60
    while not (rows := worker_rows(url)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(rows) == 1, "the worker never reported its capacity"
    first = rows[0]
    assert first.queues == ["cpu"] and first.ram_total_bytes > 0 and first.ram_available_bytes > 0
    assert first.runtimes == installed_runtimes()  # torch, onnxruntime, and llama.cpp where it is installed
    time.sleep(2.5)  # MCS_SWEEP_INTERVAL_S=1 in the stack: the sweeper beats again
    assert worker_rows(url)[0].heartbeat_at > first.heartbeat_at
