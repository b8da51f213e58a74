"""The `pipeline` deployment on real servers: prefect.yaml deployed to a PostgreSQL-backed `prefect server`, run by a
process worker, tracked on a PostgreSQL-backed `mlflow server`; a worker killed mid-stage; two runs at once."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
import yaml

from ..helpers import BIN, make_repo, sh, stop_process_tree
from .servers import POOL, Process, Stack, http_json, poll

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

DEPLOYMENT = "pipeline/pipeline"
DATA_STAGES = ["ingest", "validate", "dedup", "tokenize"]
RUN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def repo(stack: Stack, tmp_path_factory) -> Path:
    """A checkout of the project on a tiny corpus, its process pool created and `prefect deploy --all` run from it."""
    root = tmp_path_factory.mktemp("scheduled")
    repo = make_repo(root, stack.env, files=("prefect.yaml",), dirs=("tasks", "llmops", "flows", "infra"))
    stack.prefect("work-pool", "create", POOL, "--type", "process", cwd=repo)
    stack.prefect("deploy", "--all", cwd=repo)
    return repo


@pytest.fixture
def start_worker(stack: Stack, repo: Path):
    """Start process-pool workers in the checkout; each is stopped, with its flow runs, when the test ends."""
    started: list[Process] = []

    def start() -> Process:
        started.append(stack.start_worker(repo))
        return started[-1]

    yield start
    for worker in started:
        stop_process_tree(worker.proc)


def run_deployment(stack: Stack, repo: Path, **parameters) -> str:
    return stack.run_deployment(repo, DEPLOYMENT, **parameters)


def wait_for_state(stack: Stack, run_id: str, worker: Process | None = None, timeout_s: float = RUN_TIMEOUT_S) -> dict:
    return stack.wait_for_end(run_id, timeout_s, worker)


def mlflow_client(stack: Stack):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=stack.mlflow_uri)


def parent_run(stack: Stack, flow_run_id: str):
    client = mlflow_client(stack)
    experiment = client.get_experiment_by_name("llmops")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1, f"expected one MLflow parent run tagged with flow run {flow_run_id}, found {len(runs)}"
    return runs[0]


def stage_tags(run) -> dict[str, str]:
    return {stage: run.data.tags.get(f"llmops.stage.{stage}") for stage in DATA_STAGES}


def dvc_status(stack: Stack, repo: Path) -> dict:
    """Out-of-date stages among the data stages these runs cover (training stages downstream are not run here)."""
    out = sh(BIN / "dvc", "status", "--json", "--with-deps", DATA_STAGES[-1], cwd=repo, env=stack.env).stdout
    return json.loads(out or "{}")


def test_prefect_deploy_registers_the_weekly_pipeline_deployment_on_the_process_pool(stack, repo):
    deployment = http_json(f"{stack.prefect_api}/deployments/name/{DEPLOYMENT}")
    assert deployment is not None, "prefect deploy --all did not create pipeline/pipeline"
    assert deployment["work_pool_name"] == POOL
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]
    assert deployment["parameters"] == {"from_stage": None, "to_stage": None, "overrides": [], "repo_dir": ".", "lock_timeout_s": 3600}
    assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]


def test_prefect_deploy_registers_the_daily_monitor_and_the_event_driven_deploy(stack, repo):
    monitor = http_json(f"{stack.prefect_api}/deployments/name/monitor/monitor")
    assert monitor is not None, "prefect deploy --all did not create monitor/monitor"
    assert monitor["work_pool_name"] == POOL
    assert [s["schedule"]["cron"] for s in monitor["schedules"]] == ["0 4 * * *"]
    assert monitor["parameters"] == {"batch": "data/incoming/*.jsonl", "retrain": True, "repo_dir": "."}
    deploy = http_json(f"{stack.prefect_api}/deployments/name/deploy/deploy")
    assert deploy is not None, "prefect deploy --all did not create deploy/deploy"
    assert deploy["schedules"] == [] and deploy["work_pool_name"] == POOL
    assert deploy["global_concurrency_limit"]["limit"] == 1
    automations = http_json(f"{stack.prefect_api}/automations/filter", {}) or []
    linked = [a for a in automations if a["actions"] and a["actions"][0].get("deployment_id") == deploy["id"]]
    assert len(linked) == 1, f"expected one automation running deploy/deploy, found {[a['name'] for a in automations]}"
    assert linked[0]["trigger"]["expect"] == ["llmops.champion.changed"]
    assert linked[0]["trigger"]["match"] == {"prefect.resource.id": "mlflow.model.*"}
    assert deploy["parameters"]["keep_serving"] is False


def test_a_champion_changed_event_schedules_a_deploy_run_of_that_model(stack, repo):
    """What `register` emits when the gate promotes a model makes the server start `deploy` for it (no worker here:
    the run is checked while scheduled, then deleted, so later tests' workers never serve it)."""
    deploy_id = http_json(f"{stack.prefect_api}/deployments/name/deploy/deploy")["id"]
    stack.prefect(
        "event", "emit", "llmops.champion.changed", "--resource-id", "mlflow.model.llmops-code",
        "--payload", json.dumps({"name": "llmops-code", "version": "7"}), cwd=repo,
    )

    def deploy_runs():
        return http_json(f"{stack.prefect_api}/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deploy_id]}}}) or None

    runs = poll(deploy_runs, 90, "the champion-changed event never started a deploy run")
    try:
        assert [r["parameters"]["model"] for r in runs] == ["llmops-code@7"]  # the version the gate promoted
    finally:
        for run in runs:
            http_json(f"{stack.prefect_api}/flow_runs/{run['id']}", method="DELETE")


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_the_container_variants_deploy_to_pools_built_from_their_job_templates(stack, repo, kind):
    pool = f"llmops-{kind}"
    template = f"infra/prefect/{kind}-base-job-template.json"
    stack.prefect("work-pool", "create", pool, "--type", kind, "--base-job-template", template, cwd=repo)
    stack.prefect("deploy", "--all", "--prefect-file", f"infra/prefect/prefect.{kind}.yaml", cwd=repo)
    work_pool = http_json(f"{stack.prefect_api}/work_pools/{pool}")
    assert work_pool["type"] == kind
    assert work_pool["base_job_template"]["variables"]["properties"]["image"]["default"] == "llmops-pipeline:latest"
    deployment = http_json(f"{stack.prefect_api}/deployments/name/pipeline/pipeline-{kind}")
    assert deployment["work_pool_name"] == pool
    assert deployment["pull_steps"][0] == {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/llmops"}}
    assert http_json(f"{stack.prefect_api}/deployments/name/{DEPLOYMENT}")["work_pool_name"] == POOL  # the process deployment is untouched


def test_a_deployment_run_completes_and_the_mlflow_server_holds_its_runs(stack, repo, start_worker):
    worker = start_worker()
    run_id = run_deployment(stack, repo, to_stage="tokenize", overrides=["tokenize.vocab_size=600"])
    run = wait_for_state(stack, run_id, worker)
    assert run["state_type"] == "COMPLETED", f"flow run ended {run['state_type']}: {run['state']['message']}\n{worker.log.read_text()[-4000:]}"

    parent = parent_run(stack, run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["llmops.git_commit"] == sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    assert parent.data.tags["llmops.overrides"] == "tokenize.vocab_size=600"
    assert parent.data.tags["prefect.flow_run_url"].endswith(f"/flow-runs/flow-run/{run_id}")
    assert stage_tags(parent) == dict.fromkeys(DATA_STAGES, "ran")
    client = mlflow_client(stack)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["llmops.stage"] for c in children) == sorted(DATA_STAGES)
    assert all(c.info.status == "FINISHED" and c.data.metrics for c in children)
    tokenize = next(c for c in children if c.data.tags["llmops.stage"] == "tokenize")
    assert tokenize.data.params["tokenize.vocab_size"] == "600"
    assert "metrics" in {a.path for a in client.list_artifacts(tokenize.info.run_id)}  # served from the server's artifact store

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(DATA_STAGES)
    assert all(out["md5"] for stage in lock["stages"].values() for out in stage["outs"])
    assert dvc_status(stack, repo) == {}

    artifacts = http_json(f"{stack.prefect_api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": ["mlflow-run"]}}})
    assert artifacts, f"no artifact named mlflow-run on flow run {run_id}"
    assert artifacts[0]["data"] == f"[MLflow run {parent.info.run_id}]({stack.mlflow_uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id})"


def stage_process(repo: Path, stage: str) -> psutil.Process | None:
    """The live `llmops stage <stage>` process working in this checkout, if any (not one of the workers it forked,
    which share its command line)."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "cwd", "status", "ppid"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.info["cwd"] == str(repo) and cmdline[-2:] == ["stage", stage]:
            found[proc.pid] = proc
    return next((proc for proc in found.values() if proc.info["ppid"] not in found), None)


def pending_signals(pid: int) -> set[signal.Signals]:
    """The signals sent to process `pid` and not yet delivered (it is stopped): ShdPnd of /proc/<pid>/status."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return set()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("ShdPnd:")), 16)
    return {signal.Signals(n) for n in range(1, 32) if mask & (1 << (n - 1))}


def running_stage_run(stack: Stack, flow_run_id: str, stage: str):
    """The RUNNING MLflow run of `stage` under the pipeline run of `flow_run_id`, once there is one."""
    client = mlflow_client(stack)
    experiment = client.get_experiment_by_name("llmops")
    if experiment is None:
        return None
    parents = client.search_runs([experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    if not parents:
        return None
    query = f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' and tags.`llmops.stage` = '{stage}' and attributes.status = 'RUNNING'"
    return next(iter(client.search_runs([experiment.experiment_id], filter_string=query)), None)


def lock_params(repo: Path, stage: str) -> dict:
    """The params DVC recorded for `stage` in dvc.lock (what its recorded outputs were made with)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return lock["stages"].get(stage, {}).get("params", {}).get("params.yaml", {})


def test_a_worker_killed_mid_stage_crashes_the_run_and_the_next_run_resumes_from_that_stage(stack, repo, start_worker):
    # New dedup and tokenize params put both out of date; ingest and validate stay up to date.
    overrides = ["dedup.threshold=0.9", "tokenize.vocab_size=700"]
    worker = start_worker()
    crashed_id = run_deployment(stack, repo, to_stage="tokenize", overrides=overrides)
    # Mid-stage: its process is up and its MLflow run has started (before that, it is still importing).
    poll(lambda: running_stage_run(stack, crashed_id, "tokenize"), RUN_TIMEOUT_S, "the tokenize stage never started", interval_s=0.1, proc=worker.proc, log=worker.log)
    # Frozen until the flow's stop signal is waiting for it, so the stage cannot finish (and DVC record it) in the
    # moment between the worker's death and the flow noticing it.
    stage = poll(lambda: stage_process(repo, "tokenize"), 30, "the tokenize stage process never showed up", interval_s=0.05)
    stage.suspend()
    os.kill(worker.proc.pid, signal.SIGKILL)
    poll(lambda: signal.SIGINT in pending_signals(stage.pid), 60, "the flow never signalled its stage after the worker was killed", interval_s=0.05)
    stage.resume()

    crashed = wait_for_state(stack, crashed_id, timeout_s=120)
    assert crashed["state_type"] == "CRASHED", f"flow run ended {crashed['state_type']}: {crashed['state']['message']}"
    poll(lambda: stage_process(repo, "tokenize") is None, 30, "the killed run's tokenize stage outlived it")
    # DVC kept what finished (dedup) and accepted nothing of the interrupted stage.
    assert list(dvc_status(stack, repo)) == ["tokenize"]
    assert lock_params(repo, "dedup")["dedup"]["threshold"] == 0.9
    assert lock_params(repo, "tokenize").get("tokenize", {}).get("vocab_size") != 700
    crashed_parent = parent_run(stack, crashed_id)
    crashed_children = mlflow_client(stack).search_runs(
        [crashed_parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{crashed_parent.info.run_id}'"
    )
    statuses = {c.data.tags["llmops.stage"]: c.info.status for c in crashed_children}
    assert crashed_parent.info.status == "FAILED" and "RUNNING" not in statuses.values()
    assert statuses["dedup"] == "FINISHED" and statuses["tokenize"] in {"FAILED", "KILLED"}  # ended by the stage, or closed by the flow
    assert crashed_parent.data.tags["llmops.stage.dedup"] == "ran" and "llmops.stage.tokenize" not in crashed_parent.data.tags

    worker = start_worker()
    resumed_id = run_deployment(stack, repo, to_stage="tokenize", overrides=overrides)
    resumed = wait_for_state(stack, resumed_id, worker)
    assert resumed["state_type"] == "COMPLETED", f"resumed run ended {resumed['state_type']}: {resumed['state']['message']}"
    assert stage_tags(parent_run(stack, resumed_id)) == {"ingest": "cached", "validate": "cached", "dedup": "cached", "tokenize": "ran"}
    assert dvc_status(stack, repo) == {}
    assert lock_params(repo, "tokenize")["tokenize"]["vocab_size"] == 700


def flow_run_logs(stack: Stack, run_id: str) -> str:
    logs = http_json(f"{stack.prefect_api}/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}) or []
    return "\n".join(entry["message"] for entry in logs)


def test_two_runs_at_once_on_one_checkout_queue_and_a_run_that_may_not_wait_fails_clearly(stack, repo, start_worker):
    worker = start_worker()
    # The first run redoes validate, dedup and tokenize: long enough for the others to arrive while it holds the checkout.
    first = run_deployment(stack, repo, to_stage="tokenize", overrides=["validate.max_line_chars=9000", "tokenize.vocab_size=800"])
    lock_file = repo / ".dvc" / "tmp" / "llmops-pipeline.lock"
    poll(lambda: lock_file.exists() and first in lock_file.read_text(), RUN_TIMEOUT_S, "the first run never took the repository lock", log=worker.log)
    second = run_deployment(stack, repo, to_stage="tokenize", overrides=["tokenize.vocab_size=900"])
    impatient = run_deployment(stack, repo, to_stage="tokenize", overrides=["tokenize.vocab_size=1000"], lock_timeout_s=0)

    refused = wait_for_state(stack, impatient, worker)
    assert refused["state_type"] == "FAILED"
    # Logs reach the API in batches from the flow-run process: wait for them rather than race the shipper.
    poll(lambda: "another pipeline run is using" in flow_run_logs(stack, impatient), 60, "the refused run never logged why", log=worker.log)
    experiment_id = mlflow_client(stack).get_experiment_by_name("llmops").experiment_id
    assert not mlflow_client(stack).search_runs([experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{impatient}'")
    assert wait_for_state(stack, first, worker)["state_type"] == "COMPLETED"
    assert wait_for_state(stack, second, worker)["state_type"] == "COMPLETED"
    assert "waiting up to" in flow_run_logs(stack, second)

    # The runs did not overlap, and each stage saw the params of its own run.
    runs = {run_id: parent_run(stack, run_id) for run_id in (first, second)}
    assert runs[first].info.end_time <= runs[second].info.start_time
    client = mlflow_client(stack)
    for run_id, vocab_size in ((first, "800"), (second, "900")):
        parent = runs[run_id].info
        children = client.search_runs([parent.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}' and tags.`llmops.stage` = 'tokenize'")
        assert [c.data.params["tokenize.vocab_size"] for c in children] == [vocab_size]
    assert lock_params(repo, "tokenize")["tokenize"]["vocab_size"] == 900
    assert dvc_status(stack, repo) == {}
