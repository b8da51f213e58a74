"""The Prefect pipeline flow: runs the DVC stages of dvc.yaml in order under one MLflow parent run.

Each stage is a Prefect task that runs `dvc repro --single-item <stage>`, so DVC decides
whether the stage is up to date and records the new data version in dvc.lock; the flow
never re-declares the DAG. A killed run resumes from the first stage that is not up to date.
One run per checkout at a time (llmops/common/repo_lock.py); the MLflow parent run and the Prefect
flow run link to each other.
"""

from __future__ import annotations

import collections
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from llmops.common import env, headline
from llmops.common.accounting import check_accounting, read_stage_metrics
from llmops.common.errors import ConfigError, StageError
from llmops.common.repo_lock import RepoLock, describe, repo_lock
from llmops.common.stages import check_outputs_replaceable, metrics_file
from llmops.common.tracking import flatten, git_commit, run_url, setup, tracking_uri
from llmops.params.load import load_params, write_overrides

OUTPUT_TAIL_LINES = 40
OUTPUT_CHECK_MS = 200  # how often a silent stage's runner checks that its own output is still read
STOP_GRACE_S = 10
DEFAULT_LOCK_TIMEOUT_S = 3600.0

# The repository lock this process holds, by repo: the `dvc repro` children inherit it, so a
# child that outlives a killed flow process keeps the checkout locked until it exits too.
_held_locks: dict[Path, RepoLock] = {}


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


def _stream(cmd: list[str], cwd: Path, env: dict[str, str], keep_fds: tuple[int, ...] = (), drop_line: str = "") -> tuple[int, str]:
    """Run `cmd`, passing its output through (progress bars included) except lines equal to `drop_line`, and return
    (exit code, output tail).

    The command runs in a process group of its own; if this process is interrupted, cancelled or
    loses its output pipe, the whole group (dvc and the stage it started) is stopped before the
    error propagates, so no orphan keeps writing outputs that a later run would race.
    """
    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=keep_fds)
    assert proc.stdout is not None
    child_output = select.poll()
    child_output.register(proc.stdout, select.POLLIN)
    our_output = _stdout_fd()
    dropped = _LineFilter(drop_line.encode())
    try:
        pending = b""
        while True:
            # A stage can be silent for minutes; a worker killed meanwhile must not leave it running unsupervised
            # until its next line of output finds the pipe broken.
            if not child_output.poll(OUTPUT_CHECK_MS):
                if _reader_gone(our_output):
                    raise BrokenPipeError(f"the reader of this process's output is gone (its worker was killed?) while `{' '.join(cmd[-3:])}` ran")
                continue
            if not (chunk := proc.stdout.read1(65536)):
                sys.stdout.buffer.write(dropped.flush())
                sys.stdout.flush()
                break
            sys.stdout.buffer.write(dropped.feed(chunk))
            sys.stdout.flush()
            pending += chunk
            *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
            tail.extend(line.decode(errors="replace") for line in lines if line.strip())
        if pending.strip():
            tail.append(pending.decode(errors="replace"))
        return proc.wait(), "\n".join(tail)
    except BaseException:
        _stop_group(proc)
        raise


class _LineFilter:
    """Passes output through as it comes, except whole lines equal to `line`. Only a trailing piece that may still
    become that line is held back until its end arrives, so progress bars (carriage returns) stay live."""

    def __init__(self, line: bytes) -> None:
        self.line = line
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.line:
            return chunk
        data, self.held = self.held + chunk, b""
        out = []
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            if data[start:end].rstrip(b"\r") != self.line:
                out.append(data[start : end + 1])
            start = end + 1
        rest = data[start:]
        if rest and self.line.startswith(rest.rstrip(b"\r")):
            self.held = rest
        else:
            out.append(rest)
        return b"".join(out)

    def flush(self) -> bytes:
        held, self.held = self.held, b""
        return b"" if held.rstrip(b"\r") == self.line else held


def _stdout_fd() -> int | None:
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in without a file descriptor (in-process capture)
        return None


def _reader_gone(fd: int | None) -> bool:
    """Whether nothing reads `fd` any more: the write end of a pipe whose reader closed polls POLLERR (a hung-up
    terminal POLLHUP); a regular file never does."""
    if fd is None:
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _stop_group(proc: subprocess.Popen) -> None:
    # SIGINT first: the stage sees KeyboardInterrupt, so its MLflow run ends FAILED and dvc records nothing.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def stage_env(parent_run_id: str, uri: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # so dvc finds this venv's `llmops`
    return os.environ | {env.PARENT_RUN: parent_run_id, env.MLFLOW_TRACKING_URI: uri, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


@task(task_run_name="{stage}")
def run_dvc_stage(stage: str, repo: Path, parent_run_id: str, uri: str, metrics_path: Path, pushes: bool = False) -> dict[str, Any]:
    """`dvc repro --single-item STAGE`; the stage's summary line goes to this task run's log (the Prefect UI). With
    `pushes` (the flow runs `dvc push` itself at the end) DVC's hint to push is left out of the console."""
    logger = get_run_logger()
    lock = _held_locks.get(repo)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    with tempfile.TemporaryDirectory(prefix="llmops-summary-") as tmp:
        summary_file = Path(tmp) / f"{stage}.txt"
        child_env = stage_env(parent_run_id, uri) | {env.SUMMARY_FILE: str(summary_file)}
        code, tail = _stream(cmd, repo, child_env, keep_fds=(lock.fd,) if lock else (), drop_line=env.DVC_PUSH_HINT if pushes else "")
        summary = summary_file.read_text(encoding="utf-8").strip() if summary_file.exists() else ""
    if code != 0:
        raise StageError(f"stage '{stage}' failed (dvc exit code {code}). Last output:\n{tail}")
    cached = "didn't change, skipping" in tail
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    rows = [{"metric": k, "value": v} for k, v in flatten("", metrics).items()]
    create_table_artifact(key=f"{stage}-metrics", table=rows, description=summary or f"{stage}: {'up to date (cached)' if cached else 'ran'}")
    if cached:
        logger.info("%s: up to date, skipped (metrics in %s)", stage, metrics_path.name)
    else:
        logger.info("%s", summary or f"{stage}: ran")
    return {"cached": cached, "metrics": metrics, "summary": summary}


@task(retries=2, retry_delay_seconds=5)
def push_outputs(repo: Path) -> None:
    """Copy every stage output to the DVC default remote (network I/O, so it retries; stage tasks do not)."""
    code, tail = _stream([sys.executable, "-m", "dvc", "push"], repo, dict(os.environ))
    if code != 0:
        raise StageError(f"dvc push failed (exit {code}): {tail}")


def close_runs_left_open(parent_run_id: str, reason: str, include_parent: bool) -> list[str]:
    """Mark KILLED the stage runs nested under `parent_run_id` (and the parent itself, if asked) that are still RUNNING.

    A stage or flow process that is killed cannot end its own MLflow run, and a run left RUNNING
    looks as if it were still going. Best effort: a failure to reach the tracking server is logged,
    not raised, so it never hides why the pipeline stopped. Returns the run ids it closed.
    """
    import mlflow

    client = mlflow.MlflowClient()
    closed: list[str] = []
    try:
        parent = client.get_run(parent_run_id)
        open_runs = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
        )
        if include_parent and parent.info.status == "RUNNING":
            open_runs.append(parent)
        for run in open_runs:
            client.set_terminated(run.info.run_id, status="KILLED")
            client.set_tag(run.info.run_id, "llmops.ended_by", reason)
            closed.append(run.info.run_id)
    except Exception as exc:
        get_run_logger().warning("could not close the MLflow runs of %s left open: %s", parent_run_id, exc)
    return closed


@flow(name="pipeline")
def pipeline(
    from_stage: str | None = None,
    to_stage: str | None = None,
    overrides: list[str] | None = None,
    repo_dir: str = ".",
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> dict[str, Any]:
    """Run the DAG of dvc.yaml (optionally a slice of it) with params.yaml plus `overrides` (KEY=VALUE).

    One run per checkout at a time: a second run waits up to `lock_timeout_s` for the first, then fails naming it.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    flow_run_id = str(flow_run.get_id() or "")
    # Overrides are written to params.yaml, so they wait for the lock like everything else.
    with repo_lock(repo, lock_timeout_s, {"prefect_flow_run_id": flow_run_id}, on_wait=logger.info) as lock:
        _held_locks[repo] = lock
        try:
            return _run_locked(repo, from_stage, to_stage, overrides or [], lock, flow_run_id, logger)
        finally:
            _held_locks.pop(repo, None)


def _run_locked(
    repo: Path, from_stage: str | None, to_stage: str | None, overrides: list[str], lock: RepoLock, flow_run_id: str, logger
) -> dict[str, Any]:
    import mlflow
    from prefect.runtime import deployment, flow_run

    params_file = repo / "params.yaml"
    # Deployments and monitor retrains come here without the CLI: the new params are validated and every output
    # folder checked before params.yaml is written or `dvc repro` deletes anything.
    check_outputs_replaceable(load_params(params_file, overrides).paths)
    if overrides:
        write_overrides(params_file, overrides)
        logger.info("params.yaml overrides written into params.yaml (they stay there): %s", ", ".join(overrides))
    params = load_params(params_file)
    stages = select_stages(stage_order(repo), from_stage, to_stage)
    uri = tracking_uri(params.tracking, params.paths.root)
    experiment_id = setup(params.tracking, params.paths.root)
    if abandoned := lock.previous_holder.get("mlflow_run_id"):
        if closed := close_runs_left_open(abandoned, "the pipeline run died holding the checkout; the next run closed it", include_parent=True):
            logger.warning("the previous pipeline run on this checkout (%s) died mid-run: marked its MLflow runs %s KILLED", describe(lock.previous_holder), ", ".join(closed))
    tags = {
        "llmops.pipeline": "true",
        "llmops.git_commit": git_commit(repo),
        "mlflow.source.git.commit": git_commit(repo),  # MLflow's own field: the run page shows and links it
        "llmops.stages": ",".join(stages),
        "llmops.overrides": ";".join(overrides),
        "prefect.flow_run_id": flow_run_id,
    }
    if env.prefect_api_url():  # a real Prefect server, so the flow run has a page to link to
        tags["prefect.flow_run_url"] = str(flow_run.ui_url)
        if deployment.name:
            tags["prefect.deployment"] = str(deployment.name)
    results: dict[str, Any] = {}
    name = headline.run_name(str(flow_run.name or ""), overrides)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags) as parent:
        run_id = parent.info.run_id
        lock.update(mlflow_run_id=run_id)
        # Linked before any stage runs, so a run that fails or crashes still points at its MLflow record.
        if url := run_url(uri, experiment_id, run_id):
            create_link_artifact(link=url, link_text=f"MLflow run {run_id}", key="mlflow-run", description="Where this pipeline run is tracked")
        else:
            create_markdown_artifact(
                key="mlflow-run",
                markdown=f"MLflow parent run `{run_id}` in experiment `{params.tracking.experiment}` at `{uri}`",
                description="Where this pipeline run is tracked",
            )
        mlflow.log_params(flatten("", params.as_params()))
        try:
            for stage in stages:
                stage_task = run_dvc_stage.with_options(retries=params.pipeline.stage_retries)
                results[stage] = stage_task(stage, repo, run_id, uri, metrics_file(stage, params.paths), pushes=params.pipeline.push)
                mlflow.set_tag(f"llmops.stage.{stage}", "cached" if results[stage]["cached"] else "ran")
        except BaseException:
            # A stage stopped mid-run (interrupt, cancel, lost worker) may not have ended its own MLflow run.
            close_runs_left_open(run_id, "the pipeline run stopped while this stage ran", include_parent=False)
            raise
        accounting = check_accounting(read_stage_metrics(params.paths))
        if accounting:
            mlflow.log_metrics({f"accounting.{k}": v for k, v in accounting.items()})
        # The numbers that rank pipeline runs, on the parent row of the run table; the summary as its description.
        summary = headline.headline_metrics(params.paths)
        if summary:
            mlflow.log_metrics(summary)
        mlflow.set_tag("mlflow.note.content", headline.description(results, summary, overrides))
        if params.pipeline.push:
            push_outputs(repo)
    return {"mlflow_run_id": run_id, "stages": results, "accounting": accounting}
