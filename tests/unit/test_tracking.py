"""A stage's MLflow run: description, git commit, dataset contexts and system metrics (a real sqlite store)."""

import time

import pytest

from llmops.common import tracking
from llmops.common.results import StageResult
from llmops.params.tracking import TrackingConfig

pytestmark = pytest.mark.unit


def test_a_training_stage_run_has_its_summary_commit_training_inputs_and_system_metrics(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LLMOPS_PARENT_RUN_ID", raising=False)
    mlflow.set_system_metrics_sampling_interval(1)
    data = tmp_path / "data" / "tokens"
    data.mkdir(parents=True)
    (data / "train-00000.bin").write_bytes(b"\0" * 8)
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text("{}")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with tracking.stage_run(cfg, tmp_path, "pretrain", {"pretrain": {"seq_len": 32}}, {"data/tokens": data}, context="training", system_metrics=True) as run_id:
            time.sleep(3)
            tracking.log_result(StageResult(metrics={"steps": 3}, summary="pretrain: " + "x" * 600), metrics_file)
    finally:
        mlflow.set_system_metrics_sampling_interval(None)
    run = mlflow.MlflowClient(cfg.uri).get_run(run_id)
    assert run.data.tags["mlflow.note.content"] == "pretrain: " + "x" * 600  # untruncated
    assert "mlflow.source.git.commit" in run.data.tags
    assert [t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"] == ["training"]
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)
