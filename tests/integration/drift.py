"""The drift path on the real stack, as the scheduled deployments run it: the `monitor` deployment flags a batch and runs
the `pipeline` deployment, the register gate promotes the retrained model, and its llmops.champion.changed event starts
the `deploy` deployment, which moves `production`. No pytest here, so the drift benchmark times the same path."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from ..helpers import BIN, make_repo, sh
from .servers import POOL, TERMINAL_STATES, NotReady, Process, Stack, http_json, poll


def retrain_repo(stack: Stack, root: Path, edit_params: Callable[[dict], None] | None = None, deployments: bool = True) -> Path:
    """A tiny-corpus checkout run to `tokenize` (the reference statistics the monitor compares with), with (`deployments`)
    its three deployments registered on the stack's Prefect server. `edit_params` changes params.yaml before the commit."""
    repo = make_repo(root, stack.env, files=("prefect.yaml",), dirs=("tasks", "llmops", "flows", "infra"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"].update(max_problems=0, compare_base=False, max_pairs=1)  # the gate needs perplexity only
    params["register"].update(log_transformers_flavor=False)
    if edit_params:
        edit_params(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "commit", "-qam", "drift test params", cwd=repo)
    sh(BIN / "llmops", "run", "--to", "tokenize", cwd=repo, env=stack.env, timeout=900)
    if deployments:
        stack.prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", cwd=repo)
        stack.prefect("deploy", "--all", cwd=repo)
    return repo


def write_batch(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"{path.stem}/{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def server_time(flow_run: dict, key: str) -> datetime:
    return datetime.fromisoformat(flow_run[key].replace("Z", "+00:00"))


@dataclass
class Rollout:
    """The three flow runs of one drift, as the Prefect API reports them, and how long each step took."""

    monitor: dict
    pipeline: dict
    deploy: dict
    monitor_mlflow_run: str
    model_spec: str
    wall_s: float  # from `prefect deployment run monitor/monitor` to the deploy run seen Completed

    @property
    def seconds(self) -> dict[str, float]:
        """Server-side timings: check (monitor start to pipeline start), retrain (the pipeline run), event to roll-out
        start (register's event, the automation, the worker picking the run up; from the pipeline run's end, so negative
        when the roll-out starts while the pipeline's last steps, the summary stage and dvc push, still run), roll-out
        (the deploy run)."""
        return {
            "check": (server_time(self.pipeline, "start_time") - server_time(self.monitor, "start_time")).total_seconds(),
            "retrain_and_gate": (server_time(self.pipeline, "end_time") - server_time(self.pipeline, "start_time")).total_seconds(),
            "event_to_rollout": (server_time(self.deploy, "start_time") - server_time(self.pipeline, "end_time")).total_seconds(),
            "rollout": (server_time(self.deploy, "end_time") - server_time(self.deploy, "start_time")).total_seconds(),
            "total": self.wall_s,
        }


def deployment_id(stack: Stack, name: str) -> str:
    deployment = http_json(f"{stack.prefect_api}/deployments/name/{name}")
    if not deployment:
        raise NotReady(f"no deployment {name} on {stack.prefect_api}")
    return deployment["id"]


def drift_to_production(stack: Stack, repo: Path, batch: str, worker: Process, timeout_s: float) -> Rollout:
    """Run `monitor/monitor` on `batch`, wait for it, then for the `deploy` run its retrain's champion change started."""
    import mlflow

    started = time.monotonic()
    monitor_id = stack.run_deployment(repo, "monitor/monitor", batch=batch)
    monitor = stack.wait_for_end(monitor_id, timeout_s, worker)
    if monitor["state_type"] != "COMPLETED":
        raise NotReady(f"monitor run {monitor_id} ended {monitor['state_type']}: {monitor['state']['message']}\n{worker.log.read_text()[-6000:]}")
    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)
    experiment = client.get_experiment_by_name("llmops-monitor")
    [checked] = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    tags = checked.data.tags
    if tags.get("llmops.retrain.mode") != "deployment":
        raise NotReady(f"the monitor did not retrain through the pipeline deployment: tags {tags}")
    pipeline = stack.flow_run(tags["llmops.retrain.flow_run_id"])
    champion = tags["llmops.retrain.champion"].split(" -> ")[-1]
    spec = f"{yaml.safe_load((repo / 'params.yaml').read_text())['register']['model_name']}@{champion}"
    deploy_deployment = deployment_id(stack, "deploy/deploy")

    def rollout_ended():
        body = {"flow_runs": {"deployment_id": {"any_": [deploy_deployment]}}}
        runs = [r for r in http_json(f"{stack.prefect_api}/flow_runs/filter", body) or [] if r["parameters"].get("model") == spec]
        return runs[0] if runs and runs[0]["state_type"] in TERMINAL_STATES else None

    deploy = poll(rollout_ended, timeout_s, f"no deploy run of {spec} ended", log=worker.log)
    return Rollout(monitor, pipeline, deploy, checked.info.run_id, spec, time.monotonic() - started)
