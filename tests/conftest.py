"""The suite's configuration. The environment module comes first: it points the MCS_ settings at the test database,
Redis and a temporary artifact folder before any service module reads them. Fixtures live in tests/fixtures/."""

import tests.fixtures.environment  # noqa: F401 (sets the environment first)

pytest_plugins = [
    "tests.fixtures.database",
    "tests.fixtures.device",
    "tests.fixtures.api",
    "tests.fixtures.services",
    "tests.fixtures.browser",
]
