"""Prometheus metrics at the proxy's /metrics: the counts of a served micro model match the requests sent, and with
serve.capture off nothing is written."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmops.params.load import load_params
from llmops.serving.backends import inspect_model
from llmops.serving.metrics import OTHER_ROUTE, ResponseMeter, exported_names, route_label
from llmops.serving.server import serving

from .conftest import API_KEY, write_project

COMPLETIONS = "/v1/completions"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, from a scrape."""
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.unit
def test_route_labels_are_the_served_routes_and_any_other_path_is_other():
    assert route_label("/v1/chat/completions") == "/v1/chat/completions"
    assert route_label("/v1/../admin") == route_label("/reset") == OTHER_ROUTE


@pytest.mark.unit
def test_a_stream_meter_times_the_first_text_not_the_role_chunk_and_takes_the_usage():
    meter = ResponseMeter(stream=True)
    meter.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n', now=1.0)
    meter.feed(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: {"choices":[{"delta":{"con', now=2.0)
    meter.feed(b'tent":"y"}}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\ndata: [DONE]\n\n', now=3.0)
    meter.finish()
    assert meter.first_text_at == 2.0 and meter.tokens() == (7, 2)


@pytest.mark.unit
def test_a_stream_without_usage_counts_its_events_with_text_and_a_body_reads_the_usage_key_not_text():
    meter = ResponseMeter(stream=True)
    meter.feed(b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\ndata: [DONE]\n\n', now=1.0)
    assert meter.tokens() == (0, 2)
    body = ResponseMeter(stream=False)
    body.feed(b'{"choices":[{"text":"{\\"prompt_tokens\\": 99}"}],"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}', now=1.0)
    body.finish()
    assert body.tokens() == (4, 3)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, micro_model) -> Iterator[dict]:
    """A served micro model (capture off) gets known requests; then /metrics is scraped with and without the key."""
    from openai import OpenAI

    root = write_project(tmp_path_factory.mktemp("metrics"))
    cfg = load_params(root / "params.yaml").serve
    assert not cfg.capture
    seen: dict = {"generated": 0, "prompt": 0}
    with serving(inspect_model(micro_model, "micro"), cfg, "transformers", API_KEY, log_dir=root / "logs", cwd=root) as server:
        client = OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)
        for i in range(3):
            usage = client.completions.create(model="micro", prompt=f"def f{i}(x):", max_tokens=3).usage
            seen["generated"] += usage.completion_tokens
            seen["prompt"] += usage.prompt_tokens
        chunks = list(client.completions.create(model="micro", prompt="import os", max_tokens=4, stream=True, stream_options={"include_usage": True}))
        usage = next(c.usage for c in chunks if c.usage is not None)
        seen["generated"] += usage.completion_tokens
        seen["prompt"] += usage.prompt_tokens
        body = {"model": "micro", "prompt": "x", "max_tokens": 2}
        seen["statuses"] = [
            httpx.post(server.url + COMPLETIONS, json=body).status_code,
            httpx.post(server.url + COMPLETIONS, json=body, headers={"Authorization": "Bearer wrong"}).status_code,
            httpx.post(server.url + COMPLETIONS, json=body | {"max_tokens": 10**6}, headers=server.auth_headers).status_code,
        ]
        seen["without_key"] = httpx.get(f"{server.url}/metrics").status_code
        seen["backend"] = httpx.get(f"{server.url}/metrics/backend", headers=server.auth_headers)
        metrics = httpx.get(f"{server.url}/metrics", headers=server.auth_headers)
        seen["content_type"] = metrics.headers["content-type"]
        seen["scrape"] = samples(metrics.text)
    seen["root"] = root
    yield seen


@pytest.mark.integration
def test_request_counts_by_status_match_the_requests_sent(scraped):
    scrape = scraped["scrape"]
    assert scraped["statuses"] == [401, 401, 400]
    assert value(scrape, "llmops_requests_total", route=COMPLETIONS, status="200") == 4
    assert value(scrape, "llmops_requests_total", route=COMPLETIONS, status="401") == 2
    assert value(scrape, "llmops_requests_total", route=COMPLETIONS, status="400") == 1
    assert value(scrape, "llmops_refused_requests_total", route=COMPLETIONS, code="invalid_api_key") == 2
    assert value(scrape, "llmops_refused_requests_total", route=COMPLETIONS, code="invalid_value") == 1
    assert scraped["content_type"].startswith("text/plain")


@pytest.mark.integration
def test_the_latency_histogram_counts_every_request_and_ttft_every_stream(scraped):
    scrape = scraped["scrape"]
    assert value(scrape, "llmops_request_duration_seconds_count", route=COMPLETIONS) == 7
    assert value(scrape, "llmops_request_duration_seconds_bucket", route=COMPLETIONS, le="+Inf") == 7
    assert value(scrape, "llmops_request_duration_seconds_sum", route=COMPLETIONS) > 0
    assert value(scrape, "llmops_time_to_first_token_seconds_count", route=COMPLETIONS) == 1


@pytest.mark.integration
def test_token_counters_match_the_usage_the_client_got(scraped):
    scrape = scraped["scrape"]
    assert value(scrape, "llmops_generated_tokens_total", route=COMPLETIONS) == scraped["generated"] > 0
    assert value(scrape, "llmops_prompt_tokens_total", route=COMPLETIONS) == scraped["prompt"] > 0


@pytest.mark.integration
def test_backend_health_gauge_is_up_and_metrics_need_the_key(scraped):
    assert value(scraped["scrape"], "llmops_backend_up") == 1
    assert value(scraped["scrape"], "llmops_requests_in_flight") == 1  # the scrape itself
    assert scraped["without_key"] == 401
    assert scraped["backend"].status_code == 404 and "transformers serve exports none" in scraped["backend"].json()["error"]["message"]


@pytest.mark.integration
def test_every_sample_scraped_is_a_name_the_proxy_declares(scraped):
    assert {name for name, _ in scraped["scrape"]} <= exported_names()


@pytest.mark.integration
def test_with_capture_off_nothing_is_written(scraped):
    cfg = load_params(scraped["root"] / "params.yaml").serve
    assert not (scraped["root"] / cfg.capture_dir).exists()
    assert list(scraped["root"].rglob("*capture-*")) == []
