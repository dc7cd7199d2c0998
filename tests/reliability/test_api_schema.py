"""The monitor's HTTP API against its own OpenAPI schema (schemathesis), on a running machine.

A real 2-GPU machine (supervisord, the monitor, simulated instances) serves /openapi.json;
schemathesis generates requests for every operation, restarts included (a restart is a
legitimate request), with the bearer token. Every answer must match the schema (status code,
content type, headers, body) and none may be a server error the schema does not document: the
documented 503s are /healthz without supervisord, /readyz while an instance restarts and the job
API's back-pressure.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support import Machine, simulated_machine, wait_until

pytestmark = pytest.mark.integration

TOKEN = "api-schema-test-token"


def no_undocumented_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 5xx is a failure unless the operation documents exactly that status."""
    if response.status_code >= 500:
        documented = {str(code) for code in case.operation.definition.raw.get("responses", {})}
        if str(response.status_code) not in documented:
            raise AssertionError(
                f"{case.operation.label}: undocumented server error {response.status_code}: {response.text[:300]}"
            )
    return None


CHECKS = [
    no_undocumented_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    m = simulated_machine(tmp_path_factory.mktemp("api-machine"), 2, ORCHESTRATOR_TOKEN=TOKEN, JOB_TIMEOUT="15s",
                          GPU_SAMPLE_INTERVAL="0.5")
    try:
        m.up()
        assert wait_until(m.ready, 60, 0.2), m.run("status").stdout
        yield m
    finally:
        m.down()


@pytest.fixture(scope="module")
def api_schema(api_machine: Machine) -> Any:
    return schemathesis.openapi.from_url(f"{api_machine.monitor_url}/openapi.json")


def fuzz(operation: Any, max_examples: int, statuses: list[int], mode: GenerationMode) -> str | None:
    """Run generated cases of one operation; the failure (hypothesis' minimal example) or None."""

    @settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS, timeout=30)
        statuses.append(response.status_code)

    try:
        run()
    except Unsatisfiable:
        return None  # no parameters and no body: there is no invalid request to make
    except (AssertionError, schemathesis.errors.SchemathesisError, FailureGroup) as exc:
        return f"{operation.label} ({mode.value} data): {type(exc).__name__}: {str(exc)[:1500]}"
    return None


# (schemathesis' own pytest plugin, @schema.parametrize with a fixture-loaded schema, fails under
# pytest 9 — 'Function' object has no attribute '_nodeid' — so the operations are driven here.)
def test_every_operation_answers_within_its_schema_and_never_with_an_undocumented_5xx(
    api_schema: Any, api_machine: Machine
) -> None:
    labels, failures = [], []
    seen: dict[str, list[int]] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        # data that fits the schema, then data that does not (wrong types, missing fields): both
        # must be answered as documented, and never with an undocumented 5xx
        for mode, examples in ((GenerationMode.POSITIVE, 15), (GenerationMode.NEGATIVE, 10)):
            failure = fuzz(operation, examples, seen.setdefault(operation.label, []), mode)
            if failure:
                failures.append(failure)
    print("\n" + "\n".join(f"{label}: {len(codes)} calls, statuses {sorted(set(codes))}" for label, codes in seen.items()))
    assert all(seen.values()), seen
    assert "POST /instances/{gpu}/restart" in labels, labels
    assert "GET /metrics" in labels, labels
    assert len(labels) >= 12, labels
    assert not failures, "\n\n".join(failures)


def documented(api_machine: Machine, method: str, path: str) -> dict[str, Any]:
    doc = requests.get(f"{api_machine.monitor_url}/openapi.json", timeout=5).json()
    return dict(doc["paths"][path][method]["responses"])


def test_a_job_body_that_is_not_utf8_gets_the_documented_400_body(api_machine: Machine) -> None:
    r = requests.post(f"{api_machine.monitor_url}/jobs", data=b"\xff\xfe{",
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert {"error", "message"} <= set(r.json()), r.text


def test_a_job_body_that_is_not_json_gets_the_documented_400_body(api_machine: Machine) -> None:
    r = requests.post(f"{api_machine.monitor_url}/jobs", data=b"{not json",
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert {"error", "message"} <= set(r.json()), r.text


def test_a_bad_wait_on_get_job_gets_a_documented_status(api_machine: Machine) -> None:
    r = requests.get(f"{api_machine.monitor_url}/jobs/some-id", params={"wait": "abc"}, timeout=10)
    assert str(r.status_code) in documented(api_machine, "get", "/jobs/{job_id}"), (r.status_code, r.text)


def test_the_schema_lists_the_contracted_endpoints(api_machine: Machine) -> None:
    paths = set(requests.get(f"{api_machine.monitor_url}/openapi.json", timeout=5).json()["paths"])
    for path in ("/healthz", "/readyz", "/instances", "/instances/{gpu}", "/gpus", "/metrics",
                 "/instances/{gpu}/restart", "/health", "/ready", "/status"):
        assert path in paths
    # after the generated restarts, every instance comes back
    assert wait_until(api_machine.ready, 60, 0.2)
