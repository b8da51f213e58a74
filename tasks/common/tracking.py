"""The one MLflow helper stages use: a run per stage (nested under the pipeline's parent run), its params, metrics, inputs and artifacts."""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tasks.common.config import TrackingConfig
from tasks.common.result import StageResult

PARENT_RUN_ENV = "LLMOPS_PARENT_RUN_ID"


def tracking_uri(cfg: TrackingConfig, root: Path = Path(".")) -> str:
    """$MLFLOW_TRACKING_URI, else params' uri with a relative sqlite path made absolute against `root`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((Path(root) / uri[len(prefix) :]).resolve())
    return uri


def setup(cfg: TrackingConfig, root: Path = Path(".")) -> str:
    """Point MLflow at the project's store and return the experiment id (created on first use)."""
    import mlflow

    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps artifacts in ./mlartifacts; a tracking server decides for itself.
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    location = (Path(root) / cfg.artifact_root).resolve().as_uri() if local else None
    return mlflow.create_experiment(cfg.experiment, artifact_location=location)


def git_commit(repo: Path = Path(".")) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def dvc_lock_md5(path: str, lock_file: Path = Path("dvc.lock")) -> str | None:
    """The md5 DVC recorded for an output path (the data version a stage read), if dvc.lock has it."""
    if not lock_file.exists():
        return None
    lock = yaml.safe_load(lock_file.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") == path:
                return out.get("md5")
    return None


def log_dataset_input(path: str) -> None:
    """Log a stage's input directory as an MLflow dataset whose digest is its DVC md5."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    md5 = dvc_lock_md5(path)
    with warnings.catch_warnings():
        # MLflow registers two local-file source classes and warns that it picked one of them.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(path).resolve()))
    dataset = MetaDataset(source=source, name=path, digest=(md5 or "untracked")[:36])
    mlflow.log_input(dataset, context="input", tags={"dvc_md5": md5 or "not in dvc.lock"})


@contextmanager
def stage_run(cfg: TrackingConfig, stage: str, params: dict[str, Any], inputs: list[str]) -> Iterator[str]:
    """An MLflow run for one stage; nested under $LLMOPS_PARENT_RUN_ID when the pipeline flow started it.

    The run is marked FAILED if the stage raises, so a failed stage never looks finished.
    """
    import mlflow

    experiment_id = setup(cfg)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {"llmops.stage": stage, "llmops.git_commit": git_commit()}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent, tags=tags) as run:
        mlflow.log_params(flatten("", params))
        for path in inputs:
            log_dataset_input(path)
        yield run.info.run_id


def log_result(result: StageResult, metrics_file: Path) -> None:
    import mlflow

    mlflow.log_metrics(result.numeric_metrics())
    mlflow.log_artifact(str(metrics_file), artifact_path="metrics")
    for path in result.artifacts:
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        elif path.exists():
            mlflow.log_artifact(str(path))
    mlflow.set_tag("llmops.summary", result.summary)


def log_table(rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Rows (one dict each, same keys) as an MLflow table of the active stage run; nothing without one (tests)."""
    import mlflow

    if mlflow.active_run() is None or not rows:
        return
    mlflow.log_table(data={key: [row[key] for row in rows] for key in rows[0]}, artifact_file=artifact_file)
