"""The Prefect pipeline flow: runs the DVC stages of dvc.yaml in order under one MLflow parent run.

Each stage is a Prefect task that runs `dvc repro --single-item <stage>`, so DVC decides
whether the stage is up to date and records the new data version in dvc.lock; the flow
never re-declares the DAG. A killed run resumes from the first stage that is not up to date.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common.accounting import check_accounting, read_stage_metrics
from tasks.common.config import load_params, write_overrides
from tasks.common.errors import ConfigError, StageError
from tasks.common.tracking import PARENT_RUN_ENV, flatten, git_commit, setup, tracking_uri
from tasks.stages import metrics_filename

OUTPUT_TAIL_LINES = 40


def stage_order(repo: Path) -> list[str]:
    """Stage names of dvc.yaml in dependency order, as DVC itself builds the graph."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # edges point from a stage to the stages it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        return [stage.name for stage in order if getattr(stage, "name", None) and stage.path_in_repo == "dvc.yaml"]


def select_stages(order: list[str], from_stage: str | None, to_stage: str | None) -> list[str]:
    for name in (from_stage, to_stage):
        if name and name not in order:
            raise ConfigError(f"unknown stage {name!r}; dvc.yaml stages in order: {', '.join(order)}")
    start = order.index(from_stage) if from_stage else 0
    end = order.index(to_stage) + 1 if to_stage else len(order)
    if start >= end:
        raise ConfigError(f"--from {from_stage} comes after --to {to_stage} in the DAG ({' -> '.join(order)})")
    return order[start:end]


def _stream(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd`, passing its output through (progress bars included), and return (exit code, output tail)."""
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    pending = b""
    while chunk := proc.stdout.read1(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        pending += chunk
        *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
        tail.extend(line.decode(errors="replace") for line in lines if line.strip())
    if pending.strip():
        tail.append(pending.decode(errors="replace"))
    return proc.wait(), "\n".join(tail)


def stage_env(parent_run_id: str, uri: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # so dvc finds this venv's `llmops`
    return os.environ | {PARENT_RUN_ENV: parent_run_id, "MLFLOW_TRACKING_URI": uri, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


@task(task_run_name="{stage}")
def run_dvc_stage(stage: str, repo: Path, parent_run_id: str, uri: str, metrics_dir: str) -> dict[str, Any]:
    logger = get_run_logger()
    code, tail = _stream([sys.executable, "-m", "dvc", "repro", "--single-item", stage], repo, stage_env(parent_run_id, uri))
    if code != 0:
        raise StageError(f"stage '{stage}' failed (dvc exit code {code}). Last output:\n{tail}")
    cached = "didn't change, skipping" in tail
    metrics_file = repo / metrics_dir / metrics_filename(stage)
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    rows = [{"metric": k, "value": v} for k, v in flatten("", metrics).items()]
    create_table_artifact(key=f"{stage}-metrics", table=rows, description=f"{stage}: {'up to date (cached)' if cached else 'ran'}")
    logger.info("%s: %s", stage, "up to date, skipped" if cached else "ran")
    return {"cached": cached, "metrics": metrics}


@task(retries=2, retry_delay_seconds=5)
def push_outputs(repo: Path) -> None:
    """Copy every stage output to the DVC default remote (I/O, so it retries)."""
    code, tail = _stream([sys.executable, "-m", "dvc", "push"], repo, dict(os.environ))
    if code != 0:
        raise StageError(f"dvc push failed (exit {code}): {tail}")


@flow(name="pipeline")
def pipeline(
    from_stage: str | None = None, to_stage: str | None = None, overrides: list[str] | None = None, repo_dir: str = "."
) -> dict[str, Any]:
    """Run the DAG of dvc.yaml (optionally a slice of it) with params.yaml plus `overrides` (KEY=VALUE)."""
    import mlflow
    from prefect.runtime import flow_run

    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    params_file = repo / "params.yaml"
    if overrides:
        write_overrides(params_file, overrides)
        logger.info("params.yaml overrides applied for this run: %s", ", ".join(overrides))
    params = load_params(params_file)
    stages = select_stages(stage_order(repo), from_stage, to_stage)
    uri = tracking_uri(params.tracking, repo)
    experiment_id = setup(params.tracking, repo)
    tags = {
        "llmops.pipeline": "true",
        "llmops.git_commit": git_commit(repo),
        "llmops.stages": ",".join(stages),
        "llmops.overrides": ";".join(overrides or []),
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
    }
    results: dict[str, Any] = {}
    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline", tags=tags) as parent:
        mlflow.log_params(flatten("", params.model_dump(by_alias=True)))
        for stage in stages:
            stage_task = run_dvc_stage.with_options(retries=params.pipeline.stage_retries)
            results[stage] = stage_task(stage, repo, parent.info.run_id, uri, params.paths.metrics)
            mlflow.set_tag(f"llmops.stage.{stage}", "cached" if results[stage]["cached"] else "ran")
        accounting = check_accounting(read_stage_metrics(repo / params.paths.metrics))
        if accounting:
            mlflow.log_metrics({f"accounting.{k}": v for k, v in accounting.items()})
        if params.pipeline.push:
            push_outputs(repo)
        run_id = parent.info.run_id
    create_markdown_artifact(
        key="mlflow-run",
        markdown=f"MLflow parent run `{run_id}` in experiment `{params.tracking.experiment}` at `{uri}`",
        description="Where this pipeline run is tracked",
    )
    return {"mlflow_run_id": run_id, "stages": results, "accounting": accounting}
