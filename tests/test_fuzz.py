"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis +
hypothesis): every operation, with generated valid and invalid inputs, never answers 5xx and
always answers with a status, content type and body the document declares."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.inprocess import AppThread, settings_for

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    """The application in process, without the half that executes runs (and with no
    repositories: no generated request could start one anyway)."""
    with AppThread(settings_for(tmp_path_factory.mktemp("fuzz"), CRITIQUE_LOCAL_LIMITS_REQUESTS_PER_MINUTE="0")) as srv:
        yield srv


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode))
def test_api_never_errors_and_matches_its_document(fuzz_server: AppThread, mode: schemathesis.GenerationMode) -> None:
    key = fuzz_server.new_key(f"fuzzer-{mode.value}")
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    fuzzed = 0
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {key}"},
                                   checks=CHECKS, timeout=60)

        try:
            check()
            fuzzed += 1
        except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
            assert mode is schemathesis.GenerationMode.NEGATIVE
    assert fuzzed >= 8
