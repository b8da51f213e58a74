"""The monitor run that ends `llmops run` and the pipeline run it ends: two experiments, linked by tags both ways."""

import subprocess
from pathlib import Path

import pytest

from llmops.params.load import load_params

from ..helpers import BIN, ROOT, subprocess_env

pytestmark = pytest.mark.training  # the `project` fixture trains a micro model for the perplexity check

# What `llmops run` does after its pipeline flow: the monitor on the held-out batch, given the pipeline's run id.
END_OF_RUN = (
    "import sys\n"
    "from pathlib import Path\n"
    "from flows.cli import _monitor\n"
    "print(_monitor(None, heldout=True, retrain=False, repo=Path(sys.argv[1]), force=True, pipeline_run_id=sys.argv[2]))\n"
)


def pipeline_run(project: Path) -> str:
    """A finished pipeline run with a description, in the project's pipeline experiment, as the pipeline flow leaves it."""
    import mlflow

    from llmops.common import tracking

    params = load_params(project / "params.yaml")
    experiment_id = tracking.setup(params.tracking, project)
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(params.tracking, project))
    run = client.create_run(experiment_id, run_name="pipeline quiet-owl", tags={"mlflow.note.content": "**Stages run:** none."})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_the_monitor_run_at_the_end_of_a_pipeline_run_and_the_pipeline_run_point_at_each_other(project, tmp_path):
    import mlflow

    pipeline_id = pipeline_run(project)
    env = subprocess_env(tmp_path) | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([str(BIN / "python"), "-c", END_OF_RUN, str(project), pipeline_id], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-4000:]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    monitor_experiment = client.get_experiment_by_name("llmops-monitor")
    [monitor_run] = client.search_runs([monitor_experiment.experiment_id])
    assert monitor_run.info.run_id in out.stdout, "the verdict line names the run that was linked"
    pipeline = client.get_run(pipeline_id)
    assert monitor_run.info.experiment_id != pipeline.info.experiment_id, "two experiments: nesting cannot link them"
    assert monitor_run.data.tags["llmops.pipeline_run_id"] == pipeline_id
    assert pipeline.data.tags["llmops.monitor_run_id"] == monitor_run.info.run_id
    # Each description links to the other run's page in the MLflow UI (a Markdown link to the UI's own route).
    monitor_note, pipeline_note = monitor_run.data.tags["mlflow.note.content"], pipeline.data.tags["mlflow.note.content"]
    assert f"[pipeline quiet-owl](#/experiments/{pipeline.info.experiment_id}/runs/{pipeline_id})" in monitor_note
    assert monitor_note.startswith(monitor_run.data.tags["llmops.summary"]), "the check's summary stays the description's first line"
    assert f"[{monitor_run.info.run_name}](#/experiments/{monitor_experiment.experiment_id}/runs/{monitor_run.info.run_id})" in pipeline_note
    assert pipeline_note.startswith("**Stages run:** none."), "the pipeline's own description is kept, the link appended"
