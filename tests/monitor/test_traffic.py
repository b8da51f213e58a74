"""Traffic checks on synthetic captured batches (records in serving's capture format): each check passes on traffic like
the load test and fails on traffic that is not, and a batch without capture fields is told apart."""

import json
import math

import pytest

from llmops.monitoring import checks, traffic
from llmops.params.load import parse_params
from llmops.params.monitor import MonitorConfig

from .conftest import LOAD_TEST, captured

pytestmark = pytest.mark.unit



def as_raw(records: list[dict]) -> tuple[list[str], list[str]]:
    """(text column, meta column) as ingest leaves a captured JSONL batch: every key but text and id lands in meta."""
    metas = [json.dumps({k: v for k, v in r.items() if k not in ("text", "id")} | {"path": "b.jsonl", "line": n}) for n, r in enumerate(records, 1)]
    return [r["text"] for r in records], metas


def flagged(records: list[dict], load_test: dict | None = LOAD_TEST) -> dict[str, checks.Check]:
    scores, notes, _ = traffic.traffic_scores(traffic.captured_records(*as_raw(records)), load_test, "the test load test")
    return {c.name: c for c in checks.build_checks(scores, MonitorConfig(), notes) if c.name in traffic.TRAFFIC_CHECKS}


def test_traffic_like_the_load_test_passes_every_traffic_check():
    result = flagged([captured(i, latency_s=0.7 + 0.01 * i) for i in range(20)])
    assert result["refused_share"].score == 0 and result["latency_p95_ratio"].score == pytest.approx(0.89 / 1.0, abs=0.01)
    assert result["tokens_per_s_ratio"].score == pytest.approx((32 / 0.795) / 40, rel=0.02)
    assert not any(c.flagged for name, c in result.items() if name != "prompt_length_ks")


def test_a_share_of_refused_requests_past_the_threshold_is_flagged():
    result = flagged([captured(i, refused=i < 4) for i in range(20)])
    assert result["refused_share"].score == pytest.approx(0.2) and result["refused_share"].flagged
    assert not result["latency_p95_ratio"].flagged, "refused requests are not counted in latency"


def test_latency_far_above_the_load_test_is_flagged():
    result = flagged([captured(i, latency_s=3.0, tokens_out=120) for i in range(20)])
    assert result["latency_p95_ratio"].score == pytest.approx(3.0) and result["latency_p95_ratio"].flagged
    assert not result["tokens_per_s_ratio"].flagged, "long answers at the load test's speed are slow but not degraded"


def test_tokens_per_second_far_below_the_load_test_is_flagged():
    result = flagged([captured(i, latency_s=0.8, tokens_out=4) for i in range(20)])
    assert result["tokens_per_s_ratio"].score == pytest.approx(5 / 40) and result["tokens_per_s_ratio"].flagged


def test_without_a_load_test_the_speed_checks_say_why_and_flag_nothing():
    result = flagged([captured(i) for i in range(5)], load_test=None)
    for name in ("latency_p95_ratio", "tokens_per_s_ratio"):
        assert math.isnan(result[name].score) and not result[name].flagged and "the test load test" in result[name].note


def test_records_without_capture_fields_are_not_traffic():
    texts, metas = as_raw([captured(0)])
    plain = json.dumps({"path": "corpus.jsonl", "line": 1})
    assert traffic.captured_records(["code", texts[0]], [plain, metas[0]]) == [json.loads(metas[0]) | {"text": texts[0]}]
    assert traffic.captured_records(["code"], [plain]) == []


def test_training_prompts_are_the_messages_before_the_learned_turn_joined_like_capture(tmp_path):
    rows = [{"id": "p1", "source": "s", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def f():"}, {"role": "assistant", "content": "  pass"}]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert traffic.training_prompts(tmp_path) == ["be brief\ndef f():"]
    assert traffic.training_prompts(tmp_path / "absent") == []


def test_the_load_test_is_read_from_the_newest_passing_deploy_run(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params({}, root=tmp_path)
    assert traffic.load_test_reference(params)[0] is None
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.tracking.experiment) or client.get_experiment(client.create_experiment(params.tracking.experiment))
    for status, p95 in (("failed", 9.0), ("passed", 1.5)):
        run = client.create_run(experiment.experiment_id, tags={"llmops.deploy": "true", "llmops.deploy.status": status})
        for key, value in {**LOAD_TEST, "load.latency_p95_s": p95}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    found, label = traffic.load_test_reference(params)
    assert found == {**LOAD_TEST, "load.latency_p95_s": 1.5}, "the failed deploy's load test is not the reference"
    assert run.info.run_id in label and "newest passing deploy run" in label
