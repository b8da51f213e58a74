"""Checks that only captured traffic allows: prompt lengths against the training prompts, the share of requests the
proxy refused, and latency and tokens/s against the deploy flow's load test.

A batch written by serving's request capture (`serve.capture`) carries, beside `text` and `id`, the fields in
CAPTURE_FIELDS on every record; ingest keeps them in each raw record's `meta`. A batch without them (a corpus
export, the held-out split) gets these checks as "not computed" with the reason, never a score.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from llmops.common.errors import LlmopsError

log = logging.getLogger("llmops.monitor")

# The capture contract's per-request fields the traffic checks read (see the capture batch format in serving).
CAPTURE_FIELDS = ("refused", "status", "tokens_in", "tokens_out", "latency_s")
TRAFFIC_CHECKS = ("prompt_length_ks", "refused_share", "latency_p95_ratio", "tokens_per_s_ratio")
LOAD_TEST_METRICS = ("load.latency_p95_s", "load.latency_p50_s", "load.tokens_per_s", "load.clients")


def captured_records(texts: list[str | None], metas: list[str | None]) -> list[dict[str, Any]]:
    """The raw records that carry every capture field, each as its `meta` dict plus its `text`; [] when the batch is not
    captured traffic."""
    out = []
    for text, meta in zip(texts, metas, strict=True):
        record = json.loads(meta) if meta else {}
        if all(field in record for field in CAPTURE_FIELDS):
            out.append({**record, "text": text or ""})
    return out


def request_rates(records: list[dict[str, Any]]) -> tuple[float, float, int]:
    """(p95 latency in s, median tokens/s of one request, answered requests) over requests the server answered (not
    refused, status 200, a positive latency). tokens/s of a request = tokens_out / latency_s."""
    answered = [r for r in records if not r["refused"] and r["status"] == 200 and r["latency_s"] and r["latency_s"] > 0]
    if not answered:
        return float("nan"), float("nan"), 0
    latencies = np.array([float(r["latency_s"]) for r in answered])
    rates = np.array([float(r["tokens_out"]) / float(r["latency_s"]) for r in answered])
    return float(np.percentile(latencies, 95)), float(np.median(rates)), len(answered)


def traffic_scores(records: list[dict[str, Any]], load_test: dict[str, float] | None, load_test_label: str) -> tuple[dict[str, float], dict[str, str], dict[str, Any]]:
    """(scores, notes, info) of refused_share, latency_p95_ratio and tokens_per_s_ratio for captured `records`.

    The load test's tokens/s is the whole server's (all its clients together); each of its clients streams one request
    at a time, so tokens_per_s / clients is what one request saw under that load: the batch's per-request median is
    compared with that.
    """
    scores: dict[str, float] = {}
    notes: dict[str, str] = {}
    refused = sum(1 for r in records if r["refused"])
    scores["refused_share"] = refused / len(records)
    p95, rate, answered = request_rates(records)
    info: dict[str, Any] = {"traffic_requests": len(records), "traffic_refused": refused, "traffic_answered": answered,
                            "traffic_latency_p95_s": p95, "traffic_tokens_per_s_per_request": rate}  # fmt: skip
    if not answered:
        for name in ("latency_p95_ratio", "tokens_per_s_ratio"):
            notes[name] = "not computed: no request in the batch was answered (all refused or failed)"
        return scores, notes, info
    if load_test is None:
        for name in ("latency_p95_ratio", "tokens_per_s_ratio"):
            notes[name] = f"not computed: {load_test_label}"
        return scores, notes, info
    reference_rate = load_test["load.tokens_per_s"] / max(load_test["load.clients"], 1.0)
    scores["latency_p95_ratio"] = p95 / load_test["load.latency_p95_s"] if load_test["load.latency_p95_s"] > 0 else float("nan")
    scores["tokens_per_s_ratio"] = rate / reference_rate if reference_rate > 0 else float("nan")
    info.update(load_test_latency_p95_s=load_test["load.latency_p95_s"], load_test_tokens_per_s_per_request=reference_rate)
    for name in ("latency_p95_ratio", "tokens_per_s_ratio"):
        notes[name] = f"against {load_test_label}"
    return scores, notes, info


def training_prompts(instructions_dir: Path) -> list[str]:
    """finetune's training prompts (data/instructions/train.jsonl) as capture writes a prompt: the contents of every
    message before the learned assistant turn, joined by a newline. [] when finetune has not written them."""
    path = instructions_dir / "train.jsonl"
    if not path.exists():
        return []
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            messages = json.loads(line)["messages"]
            prompts.append("\n".join(m["content"] for m in messages[:-1]))
    return prompts


def load_test_reference(params: Any) -> tuple[dict[str, float] | None, str]:
    """The deploy flow's load-test metrics to compare traffic with, and where they came from.

    monitor.load_test_run when set; else the deploy run that promoted the current `production` version (the
    version's `llmops.deploy_run` tag); else the newest deploy run that passed its gate.
    """
    import mlflow

    from llmops.common.tracking import tracking_uri
    from llmops.registry import store as registry

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(params.tracking, params.paths.root))
    run_id, label = params.monitor.load_test_run, f"monitor.load_test_run={params.monitor.load_test_run}"
    if not run_id:
        name = registry.model_name(params.register)
        try:
            version = registry.alias_version(name, "production", registry.Store.of(params.tracking, params.paths))
            if version is not None:
                run_id = client.get_model_version(name, str(version)).tags.get(registry.DEPLOY_RUN_TAG, "")
                label = f"the load test of the deploy run that promoted {name}@production (version {version})"
        except (LlmopsError, mlflow.exceptions.MlflowException) as exc:
            log.info("monitor: no %s@production to take a load test from (%s)", name, exc)
    if not run_id:
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        deploys = (
            client.search_runs([experiment.experiment_id], "tags.`llmops.deploy` = 'true'", order_by=["attributes.start_time DESC"], max_results=100)
            if experiment
            else []
        )
        passed = [r for r in deploys if r.data.tags.get("llmops.deploy.status") in ("promoted", "passed")]
        if not passed:
            return None, "no deploy run with a passing load test in the tracking store (run `llmops deploy`)"
        run_id, label = passed[0].info.run_id, "the load test of the newest passing deploy run"
    try:
        metrics = client.get_run(run_id).data.metrics
    except mlflow.exceptions.MlflowException as exc:
        return None, f"the load-test run {run_id} is not in the tracking store ({exc})"
    missing = [k for k in LOAD_TEST_METRICS if k not in metrics]
    if missing:
        return None, f"run {run_id} has no load-test metrics {missing}"
    return {k: metrics[k] for k in LOAD_TEST_METRICS}, f"{label} (MLflow run {run_id})"
