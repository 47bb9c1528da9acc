"""Property-based fuzzing of the served OpenAPI schema (schemathesis): whatever a client sends, JSON or
multipart, valid or not, the server answers without a 5xx, with a documented status and content type, and
with bodies that match the schema. Bounded: a few examples per operation, no deadline on a busy CPU."""

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)


@pytest.fixture(scope="package")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_no_server_errors(case, server):
    case.call_and_validate(
        headers=server.headers("fuzz"), timeout=60,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )
