"""Schemathesis against the app's own OpenAPI document: every operation, with valid and invalid (negative) data,
in-process on the suite's PostgreSQL with a real API key. Any 500, undocumented status, header or body that does
not match the documented schema fails the test with a curl command that reproduces it."""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

pytestmark = pytest.mark.safety
# 25 cases per operation keep the whole run near 30 s on two cores; MCS_FUZZ_EXAMPLES=500 digs deeper.
EXAMPLES_PER_OPERATION = int(os.environ.get("MCS_FUZZ_EXAMPLES", "25"))
# Checks that cannot hold for some operations; every other check (no 5xx, documented statuses, headers and bodies)
# runs everywhere, on valid and invalid data alike.
# - An upload's file must be a safe model archive or UTF-8 text/JSONL, a chunked upload's manifest names plain files
#   including config.json and safetensors, and a recipe obeys rules across fields and steps (N:M patterns, observer
#   options, step order): schema-valid data is rightly refused there (400 / 413 / 422).
# - A multipart form carries only text and files, so most "invalid" form values are valid on the wire (a null goes
#   out as the text "null", a number as its digits, an empty field means "not given"); tests/safety/test_requests.py
#   covers hostile forms instead.
# - A webhook URL must resolve to public addresses (SSRF), so schema-valid URLs are rightly refused (422).
# - An evaluation (or a search) names ids of the tenant's own rows and a metric fitting the model: random ones are
#   404 / 409 / 422.
UPLOAD = [positive_data_acceptance, negative_data_rejection]
NOT_APPLICABLE = {"POST /v1/models": UPLOAD, "POST /v1/datasets": UPLOAD, "POST /v1/jobs": [positive_data_acceptance],
                  "POST /v1/uploads": [positive_data_acceptance], "POST /v1/webhooks": [positive_data_acceptance],
                  "POST /v1/evaluations": [positive_data_acceptance], "POST /v1/searches": [positive_data_acceptance]}


def _operations() -> list[str]:
    from api.main import create_app

    return [f"{method.upper()} {path}" for path, item in create_app().openapi()["paths"].items() for method in item]


@pytest.fixture()
def fuzz_schema(unlimited_app):
    """The real app's schema, served in-process, rate limit off (hundreds of requests come from one key)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", unlimited_app)
    # Every kind of invalid input must be refused, unknown query parameters included (a typo is a 422, not ignored).
    schema.config.generation.update(allow_extra_parameters=False)
    return schema


@pytest.mark.parametrize("label", _operations())
def test_operation_matches_its_documentation(label, fuzz_schema, auth):
    method, path = label.split(" ", 1)
    operation = fuzz_schema[path][method]
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    cases = st.one_of(*(operation.as_strategy(mode) for mode in modes))

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(case=cases)
    def check(case) -> None:
        case.call_and_validate(headers=auth, excluded_checks=NOT_APPLICABLE.get(label, []))

    check()
