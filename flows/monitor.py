"""The Prefect drift-monitor flow: check a batch (llmops/monitoring/drift.py); past a threshold, emit `llmops.drift.detected` and retrain.

The retrain adds the batch to the training sources (a JSONL copy under `monitor.batches_dir`, versioned
with `dvc add`, appended to `ingest.source`) and runs the pipeline: the `pipeline/pipeline` deployment
when a Prefect server with that deployment is reachable, else the `pipeline` flow as a subflow in this
process. The pipeline's register stage gates the new model; when the champion changes, the
`deploy/deploy` deployment (or the local deploy flow) rolls it out. `llmops monitor` calls this flow,
so the CLI and a scheduled deployment run one code path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from llmops.common import env
from llmops.params.load import load_params
from llmops.common.errors import StageError

DRIFT_EVENT = "llmops.drift.detected"
PIPELINE_DEPLOYMENT = "pipeline/pipeline"
DEPLOY_DEPLOYMENT = "deploy/deploy"
# The monitor run lives in the monitor experiment: it is linked to the pipeline run it ended by these tags, both ways.
PIPELINE_RUN_TAG, MONITOR_RUN_TAG = "llmops.pipeline_run_id", "llmops.monitor_run_id"


@task(task_run_name="check {batch}")
def check_batch(batch: str, repo: Path, force: bool = False) -> Any:
    """The check's MonitorResult, or the message that says every file of `batch` was checked before."""
    from llmops.monitoring import drift
    from llmops.monitoring.ledger import BatchAlreadyChecked

    try:
        result = drift.run(load_params(repo / "params.yaml"), batch, skip_seen=not force)
    except BatchAlreadyChecked as seen:
        return str(seen)
    rows = [
        {"check": c.name, "score": None if c.score != c.score else round(c.score, 6), "threshold": c.threshold, "flagged": c.flagged, "note": c.note}
        for c in result.checks
    ]
    create_table_artifact(key="drift-checks", table=rows, description=result.summary)
    return result


def server_deployment(name: str) -> bool:
    """Whether a Prefect server (PREFECT_API_URL) is configured and has deployment `name`."""
    if not env.prefect_api_url():
        return False
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
        return True
    except ObjectNotFound:
        return False


@task(retries=2, retry_delay_seconds=5)
def version_batch(repo: Path, path: Path) -> None:
    """`dvc add` the batch copy, so the new source itself is a data version (pushed with the pipeline's outputs)."""
    out = subprocess.run([sys.executable, "-m", "dvc", "add", str(path.relative_to(repo))], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise StageError(f"dvc add {path} failed (exit {out.returncode}): {out.stderr[-2000:]}")


def run_retrain(repo: Path, overrides: list[str], logger: Any) -> dict[str, Any]:
    """Run the pipeline with `overrides`; through the deployment when a server has it, else as a subflow here."""
    if server_deployment(PIPELINE_DEPLOYMENT):
        from prefect.deployments import run_deployment

        logger.info("retrain: running deployment %s with %s", PIPELINE_DEPLOYMENT, overrides)
        flow_run = run_deployment(PIPELINE_DEPLOYMENT, parameters={"overrides": overrides}, timeout=None)
        if not flow_run.state or not flow_run.state.is_completed():
            raise StageError(f"retrain: deployment {PIPELINE_DEPLOYMENT} run {flow_run.id} ended {flow_run.state and flow_run.state.name}")
        return {"mode": "deployment", "flow_run_id": str(flow_run.id)}
    from flows.pipeline import pipeline

    logger.info("retrain: no Prefect server with %s; running the pipeline flow as a subflow with %s", PIPELINE_DEPLOYMENT, overrides)
    result = pipeline(overrides=overrides, repo_dir=str(repo))
    return {"mode": "subflow", "mlflow_run_id": result["mlflow_run_id"], "ran": [s for s, r in result["stages"].items() if not r["cached"]]}


def roll_out(repo: Path, logger: Any) -> str:
    """Deploy the new champion: on a server the deploy deployment's event trigger does it, else the local deploy flow."""
    if server_deployment(DEPLOY_DEPLOYMENT):
        # register emitted llmops.champion.changed to this server; the deployment's trigger runs the roll-out once.
        logger.info("champion changed: %s runs from the llmops.champion.changed trigger", DEPLOY_DEPLOYMENT)
        return f"deployment {DEPLOY_DEPLOYMENT}, started by the champion-changed event"
    try:
        from flows.deploy import deploy
    except ImportError:
        logger.warning("champion changed but no deploy flow here (flows/deploy.py): run `llmops deploy` to serve it")
        return "not deployed: no deploy flow in this checkout"
    deploy(repo_dir=str(repo))
    return "local deploy flow"


def link_to_pipeline(client: Any, monitor_run_id: str, pipeline_run_id: str) -> None:
    """Link a monitor run and the pipeline run it ended, both ways: they live in two experiments, so the monitor run
    cannot nest under the pipeline run as the deploy run does.

    The monitor run gets the tag `llmops.pipeline_run_id` and a description that names the pipeline run as a link on
    the MLflow run page; the pipeline run gets `llmops.monitor_run_id` and a line in its description linking back.
    The links are the UI's own `#/experiments/ID/runs/ID` addresses, relative, so they work under any tracking server.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE  # the run page's description, shown as Markdown

    monitor_run, pipeline_run = client.get_run(monitor_run_id), client.get_run(pipeline_run_id)

    def link(run: Any) -> str:
        return f"[{run.info.run_name or run.info.run_id}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})"

    client.set_tag(monitor_run_id, PIPELINE_RUN_TAG, pipeline_run_id)
    summary = monitor_run.data.tags.get("llmops.summary", "")
    client.set_tag(monitor_run_id, MLFLOW_RUN_NOTE, f"{summary}\n\n**Pipeline run:** {link(pipeline_run)} (this check ran at its end).".lstrip())
    client.set_tag(pipeline_run_id, MONITOR_RUN_TAG, monitor_run_id)
    note = pipeline_run.data.tags.get(MLFLOW_RUN_NOTE, "")
    client.set_tag(pipeline_run_id, MLFLOW_RUN_NOTE, f"{note}\n\n**Monitor run:** {link(monitor_run)} (the drift check at the end of this run).".lstrip())


@flow(name="monitor")
def monitor(batch: str, retrain: bool = True, repo_dir: str = ".", deploy: bool = True, force: bool = False, pipeline_run_id: str = "") -> dict[str, Any]:
    """Check `batch` for drift; past a threshold (and with `retrain` and monitor.retrain), retrain on it and roll out a new champion.

    Files of `batch` the monitor's ledger holds unchanged are left out (a daily run over `data/incoming/*.jsonl` checks
    only what arrived since); when none is new the run says so and ends. `force` checks every file again.
    `pipeline_run_id`: the MLflow run of the pipeline this check ends (`llmops run`); the two runs are linked by tags.
    """
    import mlflow
    from prefect.events import emit_event

    from llmops.monitoring import drift
    from llmops.registry import store as registry

    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    result = check_batch(batch, repo, force)
    if isinstance(result, str):  # nothing new in `batch`
        logger.info(result)
        create_markdown_artifact(key="drift-checks", markdown=result)
        # the keys a checked batch's answer has, so callers read both alike: nothing checked, so no run and no drift
        return {"batch_id": "", "drift": False, "mlflow_run_id": "", "metrics": {"checks": {}}, "skipped": True, "summary": result}
    logger.info(result.summary)
    out: dict[str, Any] = {
        "batch_id": result.batch_id, "drift": result.drift, "mlflow_run_id": result.mlflow_run_id, "metrics": result.metrics,
        "skipped": False, "summary": result.summary,
    }  # fmt: skip
    params = load_params(repo / "params.yaml")
    store = registry.Store.of(params.tracking, params.paths)
    client = mlflow.MlflowClient(tracking_uri=store.uri)
    if pipeline_run_id:
        link_to_pipeline(client, result.mlflow_run_id, pipeline_run_id)
    if not result.drift:
        return out
    flagged = [c.name for c in result.checks if c.flagged]
    emit_event(
        event=DRIFT_EVENT,
        resource={"prefect.resource.id": f"llmops.monitor.batch.{result.batch_id}", "prefect.resource.name": batch},
        payload={"batch": batch, "flagged": flagged, "scores": {c.name: c.score for c in result.checks if c.score == c.score}},
    )
    if not (retrain and params.monitor.retrain):
        client.set_tag(result.mlflow_run_id, "llmops.retrain", "off")
        logger.info("drift detected (%s); retrain is off, recorded only", ", ".join(flagged))
        return out
    batch_file, overrides = drift.add_to_sources(params, result)
    name = registry.model_name(params.register)
    champion_before = registry.alias_version(name, "champion", store)
    version_batch(repo, batch_file)
    client.set_tag(result.mlflow_run_id, "llmops.retrain.source", params.paths.relative(batch_file))
    outcome = run_retrain(repo, overrides, logger)
    champion_after = registry.alias_version(name, "champion", store)
    retrain_run = {**outcome, "batch_file": params.paths.relative(batch_file), "overrides": overrides, "champion_before": champion_before, "champion_after": champion_after}
    for key in ("mode", "mlflow_run_id", "flow_run_id"):
        if key in outcome:
            client.set_tag(result.mlflow_run_id, f"llmops.retrain.{key}", outcome[key])
    client.set_tag(result.mlflow_run_id, "llmops.retrain.champion", f"{champion_before} -> {champion_after}")
    if champion_after != champion_before and deploy:
        retrain_run["rollout"] = roll_out(repo, logger)
    create_markdown_artifact(
        key="drift-retrain",
        markdown=f"Drift on `{batch}` ({', '.join(flagged)}): retrained via {outcome['mode']}; champion {champion_before} -> {champion_after}",
    )
    out["retrain"] = retrain_run
    return out
