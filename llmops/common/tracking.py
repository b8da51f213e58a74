"""The one MLflow helper: the tracking URI, a run per stage (nested under the pipeline's parent run), its params,
metrics, dataset inputs and artifacts, and the address of a run in the MLflow UI."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops.common import env
from llmops.common.fingerprints import dvc_lock_outputs
from llmops.common.results import StageResult

if TYPE_CHECKING:
    from llmops.params.tracking import TrackingConfig

# MLflow 3 opens an experiment on its GenAI (traces) view unless the experiment says it is for model training.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    """$MLFLOW_TRACKING_URI, else params' uri with a relative sqlite path made absolute against the repository `root`."""
    uri = env.tracking_uri_override() or cfg.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str((Path(root) / uri[len(prefix) :]).resolve())
    return uri


def setup(cfg: TrackingConfig, root: Path) -> str:
    """Point MLflow at the project's store and return the experiment id (created on first use)."""
    import mlflow

    uri = tracking_uri(cfg, root)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    # A local store keeps artifacts in ./mlartifacts; a tracking server decides for itself.
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    location = (Path(root) / cfg.artifact_root).resolve().as_uri() if local else None
    return mlflow.create_experiment(cfg.experiment, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when the tracking URI is a server (a local store has no UI address)."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def git_commit(repo: Path) -> str:
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


def log_dataset_input(path: Path, rel: str, lock_file: Path, context: str = "input") -> None:
    """Log a stage's input (absolute `path`, `rel` as dvc.lock names it) as an MLflow dataset whose digest is its DVC md5."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    md5 = dvc_lock_outputs(lock_file).get(rel)
    with warnings.catch_warnings():
        # MLflow registers two local-file source classes and warns that it picked one of them.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(Path(path).resolve()))
    dataset = MetaDataset(source=source, name=rel, digest=(md5 or "untracked")[:36])
    mlflow.log_input(dataset, context=context, tags={"dvc_md5": md5 or "not in dvc.lock"})


@contextmanager
def stage_run(
    cfg: TrackingConfig, root: Path, stage: str, params: dict[str, Any], inputs: dict[str, Path], *, context: str = "input", system_metrics: bool = False
) -> Iterator[str]:
    """An MLflow run for one stage; nested under $LLMOPS_PARENT_RUN_ID when the pipeline flow started it.

    `inputs` maps each input as dvc.yaml names it to its absolute path, logged as datasets with `context`
    (training, evaluation, input). `system_metrics` samples CPU, memory (and GPU) while the stage runs. The run is
    marked FAILED if the stage raises, so a failed stage never looks finished.
    """
    import mlflow

    experiment_id = setup(cfg, root)
    commit = git_commit(root)
    tags = {"llmops.stage": stage, "llmops.git_commit": commit, "mlflow.source.git.commit": commit}
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=stage, parent_run_id=env.parent_run_id() or None, tags=tags, log_system_metrics=system_metrics
    ) as run:
        mlflow.log_params(flatten("", params))
        for rel, path in inputs.items():
            log_dataset_input(path, rel, Path(root) / "dvc.lock", context)
        yield run.info.run_id


def log_result(result: StageResult, metrics_file: Path) -> None:
    import mlflow

    mlflow.log_metrics(result.numeric_metrics())
    if facts := result.fact_params():
        mlflow.log_params(facts)  # configuration and fixed properties: params, so metric charts hold measurements only
    mlflow.log_artifact(str(metrics_file), artifact_path="metrics")
    for path in result.artifacts:
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        elif path.exists():
            mlflow.log_artifact(str(path))
    mlflow.set_tag("llmops.summary", result.summary)
    mlflow.set_tag("mlflow.note.content", result.summary)  # the run page's description: the whole summary, untruncated


def log_table(rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Rows (one dict each, same keys) as an MLflow table of the active stage run; nothing without one (tests)."""
    import mlflow

    if mlflow.active_run() is None or not rows:
        return
    mlflow.log_table(data={key: [row[key] for row in rows] for key in rows[0]}, artifact_file=artifact_file)
