"""The per-key rate limit across API processes: shared through Redis when the broker is Redis (two app instances
draw on one bucket), per process in the embedded default, and still enforced per process while Redis is down."""

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from cli.stack import free_port
from core.service.settings import get_settings

pytestmark = pytest.mark.safety
BURST = 5
PER_MINUTE = 6


@pytest.fixture()
def two_apps(db, monkeypatch) -> Iterator[Callable[[str], tuple[TestClient, TestClient]]]:  # noqa: ANN001
    """Two instances of the real app (as two API processes would be) on the given broker, 6/min, bursts of 5: a
    token comes back every 10 s, so a slow first request on a loaded machine refills none."""
    from api.main import create_app

    clients: list[TestClient] = []

    def make(broker_url: str) -> tuple[TestClient, TestClient]:
        for name, value in {"MCS_RATE_LIMIT_PER_MINUTE": str(PER_MINUTE), "MCS_RATE_LIMIT_BURST": str(BURST),
                            "MCS_BROKER_URL": broker_url}.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        clients.extend(TestClient(create_app()).__enter__() for _ in range(2))
        get_settings.cache_clear()
        return clients[-2], clients[-1]

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    monkeypatch.undo()
    get_settings.cache_clear()


def alternate(first: TestClient, second: TestClient, headers: dict[str, str], count: int) -> list[int]:
    return [(first, second)[i % 2].get("/v1/models", headers=headers).status_code for i in range(count)]


def test_two_api_processes_share_one_limit_through_redis(two_apps, auth, other_auth):
    first, second = two_apps(get_settings().broker_url)  # the suite's Redis
    assert alternate(first, second, auth, BURST + 2) == [200] * BURST + [429] * 2
    limited = second.get("/v1/models", headers=auth)
    assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60 // PER_MINUTE
    assert limited.json()["error"]["code"] == "rate_limited"
    assert alternate(first, second, other_auth, 2) == [200, 200]  # another key has its own bucket


def test_the_embedded_default_limits_each_process_on_its_own(two_apps, auth, tmp_path):
    first, second = two_apps(f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    assert alternate(first, second, auth, 2 * BURST + 2) == [200] * 2 * BURST + [429] * 2


def test_with_redis_down_each_process_still_limits(two_apps, auth):
    first, second = two_apps(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert alternate(first, second, auth, 2 * BURST + 2) == [200] * 2 * BURST + [429] * 2


def test_made_up_keys_draw_on_the_client_address_bucket(two_apps, auth):
    """A fresh random key per request once bought a fresh bucket per request: now every request without a valid
    key, whatever it sends, spends from its client address's bucket, while a valid key keeps its own."""
    first, second = two_apps(get_settings().broker_url)
    made_up = [{"Authorization": f"Bearer mcs_made-up-{i}"} for i in range(BURST + 2)]
    statuses = [(first, second)[i % 2].get("/v1/models", headers=headers).status_code
                for i, headers in enumerate(made_up)]
    assert statuses == [401] * BURST + [429] * 2
    assert first.get("/v1/models").status_code == 429  # no key at all: the same address bucket
    assert alternate(first, second, auth, 2) == [200, 200]
