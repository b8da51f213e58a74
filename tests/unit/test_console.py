"""The console of `llmops`: library progress bars off and ours kept, unwrapped lines in log files, DVC's push hint
left out when the flow pushes, `llmops models` fitted to the terminal with rounded numbers, `llmops ui` sized."""

import json
import os
import subprocess
import sys

import pytest

from llmops.common import env

from ..conftest import ROOT

pytestmark = pytest.mark.unit

LLMOPS = str(ROOT / ".venv/bin/llmops")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any of the switches under test, so the CLI's defaults show, and without an MLflow
    URI an earlier test may have left, so the CLI reads the store its params.yaml names."""
    dropped = {env.LIBRARY_PROGRESS, env.PROGRESS, "MLFLOW_TRACKING_URI"}
    out = {k: v for k, v in os.environ.items() if k not in env.QUIET_LIBRARIES and k not in dropped}
    return out | extra


BARS = """
import json, os, sys
import flows.cli  # sets the environment as `llmops` does, before any library is imported
from llmops.common import env
from llmops.common.progress import progress
from transformers.utils import logging as hf_logging
list(progress(range(3), desc="OURS-BAR"))
list(hf_logging.tqdm(range(3), desc="LIBRARY-BAR"))
print(json.dumps({k: os.environ.get(k) for k in env.QUIET_LIBRARIES}))
"""


def test_cli_turns_library_bars_off_and_keeps_ours():
    out = subprocess.run([sys.executable, "-c", BARS], capture_output=True, text=True, cwd=ROOT, env=_clean_env(), check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == env.QUIET_LIBRARIES
    assert "OURS-BAR" in out.stderr and "LIBRARY-BAR" not in out.stderr, out.stderr


def test_library_progress_switch_turns_library_bars_back_on():
    out = subprocess.run([sys.executable, "-c", BARS], capture_output=True, text=True, cwd=ROOT, env=_clean_env(**{env.LIBRARY_PROGRESS: "1"}), check=True)
    assert set(json.loads(out.stdout.strip().splitlines()[-1]).values()) == {None}
    assert "OURS-BAR" in out.stderr and "LIBRARY-BAR" in out.stderr, out.stderr


def test_stage_summary_is_one_unwrapped_line_in_a_log_file_and_reaches_the_flow(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for stage, values in {"ingest": {"docs": 1234}, "validate": {"quarantined": 5}, "dedup": {"docs_out": 1000}, "tokenize": {"train_tokens": 987654}}.items():
        (metrics / f"{stage}.json").write_text(json.dumps(values))
    (tmp_path / "params.yaml").write_text("{}\n")
    summary_file = tmp_path / "summary.txt"
    for log_name, extra in (("dvc.log", {}), ("flow.log", {env.SUMMARY_FILE: str(summary_file)})):
        with open(tmp_path / log_name, "w") as log:  # a file, not a terminal: rich's width would be 80
            subprocess.run([LLMOPS, "stage", "summary", "--no-track"], stdout=log, stderr=log, cwd=tmp_path, env=_clean_env(**extra), check=True)
    summary = summary_file.read_text().strip()  # under the flow: handed to it (it logs the line to its run), not printed twice
    assert len(summary) > 80 and summary.startswith("summary: data.records_in 1,234")
    assert [line for line in (tmp_path / "dvc.log").read_text().splitlines() if line.strip()] == [summary]
    assert (tmp_path / "flow.log").read_text().strip() == ""


def test_pipeline_output_drops_only_the_dvc_push_hint(capfdbinary, tmp_path):
    from flows.pipeline import _stream

    script = f"import sys\nprint('Running stage x')\nsys.stdout.write('\\rbar 50%')\nsys.stdout.flush()\nprint()\nprint({env.DVC_PUSH_HINT!r})\nprint('after')"
    code, tail = _stream([sys.executable, "-c", script], tmp_path, dict(os.environ), drop_line=env.DVC_PUSH_HINT)
    shown = capfdbinary.readouterr().out.decode()
    assert code == 0
    assert shown == "Running stage x\n\rbar 50%\nafter\n"
    assert env.DVC_PUSH_HINT in tail  # the tail still says everything dvc printed


def test_line_filter_holds_back_only_a_possible_start_of_the_dropped_line():
    from flows.pipeline import _LineFilter

    hint = env.DVC_PUSH_HINT.encode()
    lines = _LineFilter(hint)
    assert lines.feed(b"\rtrain 10%") == b"\rtrain 10%"  # a progress bar passes at once
    assert lines.feed(b"\n" + hint[:10]) == b"\n"
    assert lines.feed(hint[10:] + b"\nnext") == b"next"
    assert lines.flush() == b""
    assert _LineFilter(hint).feed(hint[:5]) == b"" and _LineFilter(b"").feed(hint + b"\n") == hint + b"\n"


ROWS = [
    {"name": "llmops-code", "version": "3", "aliases": "champion", "pass_at_1": "0.062512345", "perplexity": "12.345678901",
     "base_version": "", "git_commit": "12e4567890", "eval_data": "a1b2c3d4e5", "run_id": "0123456789abcdef0123456789abcdef"},
    {"name": "llmops-code-w4a16", "version": "1", "aliases": "", "pass_at_1": 0.0, "perplexity": "1234.5678",
     "base_version": "3", "git_commit": "0011223344", "eval_data": "a1b2c3d4e5", "run_id": "fedcba9876543210fedcba9876543210"},
]


@pytest.mark.parametrize("columns", [60, 80, 120])
def test_models_table_fits_the_width_with_rounded_numbers(columns):
    from rich.console import Console

    from flows.cli import table_width, versions_table

    table, hidden = versions_table(ROWS, columns)
    console = Console(width=min(table_width(table), columns), record=True, file=open(os.devnull, "w"))
    console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= columns
    assert "0.06251" in text and "12.35" in text and "1235" in text and "12.345" not in text
    assert "12e4567890" in text or "git_commit" in hidden  # a hex prefix that reads as a number is left alone


def test_models_table_whole_when_wide():
    from flows.cli import table_width, versions_table

    table, hidden = versions_table(ROWS, None)
    assert hidden == [] and table_width(table) > 120


def test_models_cli_fits_columns_and_rounds(tmp_path):
    """A real MLflow registry with one version tagged as register tags it; COLUMNS=70 with output piped."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(f"tracking:\n  uri: {uri}\n  artifact_root: {tmp_path / 'mlartifacts'}\n")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("llmops-code")
    version = client.create_model_version("llmops-code", str(tmp_path), tags={"llmops.metric.pass_at_1": "0.0625", "llmops.metric.perplexity": "12.345678901"})
    client.set_registered_model_alias("llmops-code", "champion", version.version)
    out = subprocess.run([LLMOPS, "models"], capture_output=True, text=True, cwd=tmp_path, env=_clean_env(COLUMNS="70"))
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 70
    assert "12.35" in out.stdout and "12.3456" not in out.stdout and "champion" in out.stdout
    assert "--wide" in " ".join(out.stderr.split())
    wide = subprocess.run([LLMOPS, "models", "--wide"], capture_output=True, text=True, cwd=tmp_path, env=_clean_env(COLUMNS="70"))
    assert "run_id" in wide.stdout and max(len(line) for line in wide.stdout.splitlines()) > 70


def test_ui_is_sized_for_the_cores_and_leaves_mlflow_jobs_off(monkeypatch):
    from flows.cli import ui_command, ui_workers

    assert [ui_workers(c) for c in (1, 2, 4, 8, 64)] == [1, 1, 2, 4, 4]
    monkeypatch.delenv(env.MLFLOW_JOB_EXECUTION, raising=False)
    cmd, server_env = ui_command("sqlite:///x.db", "127.0.0.1", 5000, 1)
    assert cmd[cmd.index("--workers") + 1] == "1" and server_env[env.MLFLOW_JOB_EXECUTION] == "false"
    monkeypatch.setenv(env.MLFLOW_JOB_EXECUTION, "true")
    assert ui_command("sqlite:///x.db", "127.0.0.1", 5000, 1)[1][env.MLFLOW_JOB_EXECUTION] == "true"


FLOW = """
import sys
from pathlib import Path
import flows.cli as cli  # first, as `llmops` does: its environment before any library's import
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.logging.handlers import APILogHandler
from flows.pipeline import run_dvc_stage

repo = Path(sys.argv[1])

@flow
def one_stage():
    return run_dvc_stage("summary", repo, "", "", repo / "metrics" / "summary.json", pushes=True)

one_stage()
APILogHandler().flush()
with get_client(sync_client=True) as client:
    print("API-LOGS:", " | ".join(log.message for log in client.read_logs()), flush=True)
cli._stop_prefect_services()  # what `llmops run` does before its summary
cli.console.print("SUMMARY-LINE")
"""


def test_under_the_flow_a_stage_summary_reaches_prefect_once_without_the_push_hint_and_the_summary_is_last(tmp_path):
    """A real `dvc repro --single-item` of a stage under a Prefect flow: its summary is in the flow's logs on the
    Prefect API (what the UI shows) and once on the console; DVC's `dvc push` hint is not, as the flow pushes. Then
    Prefect's temporary server is stopped before `llmops run` prints its summary, so nothing follows the summary.
    (One test: each Prefect start costs 10-20 s on two cores.)"""
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "metrics" / "ingest.json").write_text(json.dumps({"docs": 1234}))
    (repo / "params.yaml").write_text("{}\n")
    (repo / "dvc.yaml").write_text("stages:\n  summary:\n    cmd: llmops stage summary --no-track\n    deps: [metrics/ingest.json]\n"
                                   "    metrics:\n      - metrics/summary.json:\n          cache: false\n")
    subprocess.run([str(ROOT / ".venv/bin/dvc"), "init", "--no-scm", "-q"], cwd=repo, check=True)
    flow_env = {k: v for k, v in _clean_env(PREFECT_HOME=str(tmp_path / "prefect")).items() if k != env.PREFECT_API_URL}
    out = subprocess.run([sys.executable, "-c", FLOW, str(repo)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=300, env=flow_env)
    assert out.returncode == 0, out.stdout[-3000:]
    summary = "summary: data.records_in 1,234"
    console, after = out.stdout.split("API-LOGS:", 1)
    api_logs, shutdown = after.split("\n", 1)
    assert summary in api_logs, api_logs
    assert console.count(summary) == 1, console[-3000:]
    assert "Running stage 'summary'" in console and "dvc push" not in console, console[-3000:]
    assert "Stopping temporary server" in shutdown and shutdown.strip().splitlines()[-1] == "SUMMARY-LINE", shutdown
