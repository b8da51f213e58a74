"""A drifted batch on the servers, end to end: the `monitor` deployment (run by a process worker) flags it and runs the
`pipeline` deployment with the batch added to the training sources; the register gate promotes the retrained model;
the llmops.champion.changed event starts the `deploy` deployment, which serves it and moves `production` to it."""

from __future__ import annotations

import json

import pytest
import yaml

from ..helpers import stop_process_tree
from ..monitor.conftest import PROSE
from .drift import deployment_id, drift_to_production, retrain_repo, write_batch
from .servers import Stack, http_json

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

BATCH = "incoming/prose.jsonl"


@pytest.fixture(scope="module")
def rolled_out(stack: Stack, tmp_path_factory):
    repo = retrain_repo(stack, tmp_path_factory.mktemp("retrain"))
    write_batch(repo / BATCH, PROSE)
    worker = stack.start_worker(repo)
    try:
        yield repo, drift_to_production(stack, repo, BATCH, worker, timeout_s=900)
    finally:
        stop_process_tree(worker.proc)


def mlflow_client(stack: Stack):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)


def test_the_monitor_deployment_retrains_a_drifted_batch_through_the_pipeline_deployment(stack, rolled_out):
    repo, rollout = rolled_out
    assert rollout.pipeline["deployment_id"] == deployment_id(stack, "pipeline/pipeline")
    assert rollout.pipeline["state_type"] == "COMPLETED", rollout.pipeline["state"]
    [source] = json.loads(rollout.pipeline["parameters"]["overrides"][0].split("=", 1)[1])[-1:]
    assert source.startswith("data/batches/") and (repo / f"{source}.dvc").exists(), "the batch is a training source and a DVC data version"
    client = mlflow_client(stack)
    checked = client.get_run(rollout.monitor_mlflow_run).data.tags
    assert checked["llmops.drift"] == "true" and checked["llmops.retrain.flow_run_id"] == rollout.pipeline["id"]
    [parent] = client.search_runs(
        [client.get_experiment_by_name("llmops").experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{rollout.pipeline['id']}'"
    )
    assert parent.data.tags["prefect.deployment"] == "pipeline" and parent.data.tags["llmops.stage.register"] == "ran"
    assert all(parent.data.tags[f"llmops.stage.{s}"] == "ran" for s in ("ingest", "tokenize", "pretrain", "finetune")), "the new data retrained everything"


def test_the_gated_champion_is_rolled_out_once_by_the_champion_changed_trigger(stack, rolled_out):
    repo, rollout = rolled_out
    register = json.loads((repo / "metrics" / "register.json").read_text())
    name = yaml.safe_load((repo / "params.yaml").read_text())["register"]["model_name"]
    assert register["decision"] == "promoted" and register["event"].startswith("sent ("), register
    assert rollout.model_spec == f"{name}@{register['version']}"
    assert rollout.deploy["state_type"] == "COMPLETED", rollout.deploy["state"]
    model = mlflow_client(stack).get_registered_model(name)
    assert str(model.aliases["production"]) == str(model.aliases["champion"]) == str(register["version"])
    runs = http_json(f"{stack.prefect_api}/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id(stack, "deploy/deploy")]}}})
    assert [r["parameters"]["model"] for r in runs] == [rollout.model_spec], "one roll-out per champion change, not a second one from the monitor"
    seconds = rollout.seconds
    assert all(seconds[k] > 0 for k in ("check", "retrain_and_gate", "rollout", "total")), seconds
    # register's event starts the roll-out; the pipeline's last steps (the summary stage, dvc push) may still be running
    assert -seconds["retrain_and_gate"] < seconds["event_to_rollout"], seconds
