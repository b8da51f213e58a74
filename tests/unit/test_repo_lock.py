"""The checkout lock that keeps two pipeline runs from sharing one repository; the MLflow link and clean-up of a run."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from flows.pipeline import close_runs_left_open
from llmops.common.tracking import run_url as mlflow_run_url
from llmops.common.repo_lock import RepoBusyError, repo_lock

pytestmark = pytest.mark.unit


def test_a_run_that_may_not_wait_fails_at_once_naming_the_holder(tmp_path):
    with repo_lock(tmp_path, 0, {"prefect_flow_run_id": "first-run"}):
        started = time.monotonic()
        with pytest.raises(RepoBusyError, match=r"another pipeline run is using .*prefect_flow_run_id=first-run.*pid=\d+"):
            with repo_lock(tmp_path, 0, {"prefect_flow_run_id": "second-run"}):
                pass
        assert time.monotonic() - started < 1


def test_a_waiting_run_takes_the_lock_once_the_holder_releases_it(tmp_path):
    held, release = threading.Event(), threading.Event()

    def holder():
        with repo_lock(tmp_path, 0, {"prefect_flow_run_id": "first-run"}):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    waits: list[str] = []
    threading.Timer(1.5, release.set).start()
    with repo_lock(tmp_path, 30, {"prefect_flow_run_id": "second-run"}, on_wait=waits.append) as lock:
        assert lock.record["prefect_flow_run_id"] == "second-run"
        assert lock.previous_holder == {}  # the first run finished and cleared its record
    thread.join(10)
    assert len(waits) == 1 and "first-run" in waits[0]


def test_a_holder_killed_with_sigkill_frees_the_lock_and_leaves_its_record_for_the_next_run(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from llmops.common.repo_lock import repo_lock
        with repo_lock(Path({str(tmp_path)!r}), 0, {{"prefect_flow_run_id": "doomed"}}) as lock:
            lock.update(mlflow_run_id="abc123")
            print("held", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with repo_lock(tmp_path, 5, {}) as lock:
            assert lock.previous_holder["prefect_flow_run_id"] == "doomed"
            assert lock.previous_holder["mlflow_run_id"] == "abc123"
    finally:
        proc.kill()
        proc.wait(10)


def test_the_mlflow_link_is_a_ui_page_on_a_tracking_server_and_absent_for_a_local_store():
    assert mlflow_run_url("http://mlflow:5000/", "3", "r1") == "http://mlflow:5000/#/experiments/3/runs/r1"
    assert mlflow_run_url("sqlite:////tmp/mlflow.db", "3", "r1") is None


def test_runs_a_killed_pipeline_left_running_are_closed_and_finished_ones_kept(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("llmops", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id).info.run_id
    finished = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(finished, status="FINISHED")
    left_open = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id

    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)  # what the flow's setup() does before it closes runs
    try:
        assert close_runs_left_open(parent, "test", include_parent=False) == [left_open]
        assert client.get_run(parent).info.status == "RUNNING"
        assert close_runs_left_open(parent, "test", include_parent=True) == [parent]
    finally:
        mlflow.set_tracking_uri(previous_uri)
    statuses = {run_id: client.get_run(run_id).info.status for run_id in (parent, finished, left_open)}
    assert statuses == {parent: "KILLED", finished: "FINISHED", left_open: "KILLED"}
    assert client.get_run(left_open).data.tags["llmops.ended_by"] == "test"


def test_a_silent_stage_is_stopped_soon_after_the_reader_of_the_runs_output_dies(tmp_path):
    """A Prefect process worker reads its flow run's stdout; when the worker is killed, the stage the run started must
    stop within a second, not whenever it next prints (a quiet stage could finish, unsupervised, first)."""
    import psutil

    from tests.helpers import ROOT

    pid_file, outcome = tmp_path / "stage.pid", tmp_path / "outcome.txt"
    silent_stage = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    runner = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from flows.pipeline import _stream
        try:
            _stream([sys.executable, "-c", {silent_stage!r}], cwd={str(tmp_path)!r}, env=dict(os.environ))
        except BrokenPipeError as exc:
            open({str(outcome)!r}, "w").write(f"stopped: {{exc}}")
    """)
    run, stage = subprocess.Popen([sys.executable, "-c", runner], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL), None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and run.poll() is None, "the stage never started"
            time.sleep(0.05)
        stage = psutil.Process(int(pid_file.read_text()))
        run.stdout.close()  # the worker reading the run's output is gone
        closed = time.monotonic()
        assert run.wait(timeout=30) == 0
        stage.wait(timeout=10)  # psutil.TimeoutExpired, a failure, if the stage is still running
        assert time.monotonic() - closed < 20, "the stage outlived its unread run"  # it sleeps 120 s: 20 s allows a loaded machine
    finally:
        if run.poll() is None:
            run.kill()
        if stage is not None and stage.is_running():
            stage.kill()
    assert outcome.read_text().startswith("stopped: the reader of this process's output is gone")
