"""Schemathesis against the running service: a real uvicorn process on the shipped models,
fuzzed from its own OpenAPI document with every check schemathesis has. It asserts what
issue 18 asks: no 5xx, no answer outside its documented schema, status or content type,
and the schema and the parser agreeing on what is well formed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_redis import ApiProcess

SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "models"
API_KEY = "schemathesis-key"
EXAMPLES = 200  # per operation; POST /score, the one with a body, is where they matter
MIN_SCORE_REQUESTS = 150

CONFIG = {
    "headers": {"X-API-Key": API_KEY},
    "checks": {
        # Which arrays, records and models are valid is decided by each model's manifest,
        # not by the schema (a [1, 32, 32] array is right for one model and wrong for the
        # next), so a schema-valid body may still be refused with 404, 413 or 422.
        "positive_data_acceptance": {
            "expected-statuses": ["2xx", "401", "404", "413", "422", "504"]
        },
    },
    "operations": [
        {
            # The KServe v2 routes answer a request the protocol does not allow (an input
            # name or datatype the model lacks, a model that is not ready) with 400, as
            # the protocol and Triton do.
            "include-path-regex": "^/v2",
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "400", "401", "404", "413", "422", "504"]
                },
            },
        }
    ],
}


@pytest.fixture(scope="module")
def live_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    # With a key configured, `ignored_auth` can check that /score refuses requests without.
    api = ApiProcess(
        SHIPPED_MODELS,
        tmp_path_factory.mktemp("schemathesis"),
        api_keys=API_KEY,
        providers="cpu",
        request_timeout_ms=5000,
    )
    try:
        api.wait_up(timeout=120).wait_ready(timeout=120)
        config = schemathesis.Config.from_dict(CONFIG)
        yield schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config)
        # The fuzzer really ran: enough scoring requests reached the server, none a 5xx.
        scored = _requests_by_status(httpx.get(f"{api.url}/metrics").text)
        print(f"POST /score answers by status: {scored}")
        assert sum(scored.values()) >= MIN_SCORE_REQUESTS, scored
        assert not [s for s in scored if s.startswith("5")], scored
    finally:
        api.stop()


def _requests_by_status(metrics: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics):
        if family.name == "gansentry_requests":
            for sample in family.samples:
                if sample.name == "gansentry_requests_total":
                    status = sample.labels["status"]
                    counts[status] = counts.get(status, 0) + int(sample.value)
    return counts


schema = schemathesis.pytest.from_fixture("live_schema")


# /admin/reload rescans the model repository: fuzzing it only measures disk reads.
@schema.exclude(path="/admin/reload").parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_service_conforms_to_its_openapi_document(case) -> None:
    case.call_and_validate(timeout=30)
