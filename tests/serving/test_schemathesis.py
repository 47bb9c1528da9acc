"""Property-based fuzzing of the served OpenAPI schema (schemathesis): whatever a client sends, JSON or
multipart, valid or not, the server answers without a 5xx, with a documented status and content type, and
with bodies that match the schema. Bounded: a few examples per operation, no deadline on a busy CPU.

Drives schemathesis through its Python API (one hypothesis run per operation) rather than its pytest
plugin, whose hooks reach into pytest internals that change between pytest releases."""

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_no_server_errors(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5, f"the served schema lists too few operations: {[o.label for o in operations]}"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        def fuzz(case):
            case.call_and_validate(headers=server.headers("fuzz"), timeout=60, checks=CHECKS)

        try:
            fuzz()
        except Exception as err:  # name the operation: hypothesis' own report does not
            raise AssertionError(f"{operation.label}: {err}") from err
