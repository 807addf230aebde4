"""The served OpenAPI document, fuzzed with schemathesis against a live gateway: every generated request,
valid or not, gets a documented answer, never a server error, and 200 bodies match their schemas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import FakeRunner, live_gateway, make_settings

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def api_schema(tiny_bundle: Path) -> Iterator[Any]:
    with live_gateway(make_settings(tiny_bundle, max_batch_rows=16), FakeRunner()) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_documented_route_answers_as_documented(api_schema: Any) -> None:
    """Each operation, 25 generated cases, schemathesis's default checks: no 5xx, documented status codes,
    content types and headers, 200 bodies matching their schemas. Except "schema-valid data is accepted": a
    valid request whose values overflow the model (e.g. 3e38 times a weight) gets a documented 422. Driven
    through hypothesis directly: the schemathesis pytest plugin does not load under pytest 9."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9
    answered: list[int] = []

    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            answered.append(case.call_and_validate(excluded_checks=[positive_data_acceptance]).status_code)

        check()
    assert len(answered) >= 40 and 200 in answered and any(400 <= code < 500 for code in answered)


def test_the_document_names_this_bundle(tiny_bundle: Path) -> None:
    from gateway.artifacts import load_bundle
    from gateway.openapi import openapi_document

    doc = openapi_document(load_bundle(tiny_bundle).manifest, max_rows=8)
    assert doc["paths"]["/v2/models/{model}/infer"]["post"]["parameters"][0]["schema"]["enum"] == ["tiny"]
    assert {"/predict", "/readyz", "/v2/models/{model}/infer"} <= set(doc["paths"])
