"""A generated fuzzer against a real ``ah-server``, from the hub's own OpenAPI document
(schemathesis): every operation, with bodies drawn from the declared schemas (and broken
ones), must answer without a server error and as the document says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import HubProcess

EXAMPLES = int(os.environ.get("AHMOUNT_FUZZ_EXAMPLES", "15"))


@pytest.mark.slow
def test_the_api_honours_its_own_document(tmp_path: Path) -> None:
    # A server of its own: what the fuzzer creates, shares and makes public touches no test.
    sqlite_server = HubProcess(tmp_path / "data")
    _, key = sqlite_server.fresh_user()
    sqlite_server.start()
    try:
        _fuzz_every_operation(sqlite_server, key)
    finally:
        sqlite_server.stop()


def _fuzz_every_operation(sqlite_server: HubProcess, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    schema = schemathesis.openapi.from_url(f"{sqlite_server.url}/api/v1/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            # Every check but positive-data acceptance: a body can match the schema and
            # still break a rule of the domain (a branch of a dataset, a merge of main),
            # which is a 400 with a message, not a fault.
            case.call_and_validate(base_url=sqlite_server.url, headers=headers,
                                   excluded_checks=[positive_data_acceptance])

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as exc:  # every operation is tried
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:3000])
    assert operations >= 30
    assert not failures, "\n\n".join(failures)
