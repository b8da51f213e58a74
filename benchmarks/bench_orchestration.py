"""Orchestration overhead: the data stages through the `pipeline` deployment on a real server vs plain `dvc repro`.

In one session, on the default corpus (params.yaml: the Python stdlib source), two identical
temporary git+DVC checkouts of the project run ingest -> validate -> dedup -> tokenize:

  dvc repro   `dvc repro tokenize` in checkout A (DVC alone; each stage logs to the MLflow server)
  deployment  `prefect deployment run pipeline/pipeline` with to_stage=tokenize in checkout B, run by a
              process worker: flow-run process, pull step, repository lock, MLflow parent run, a Prefect
              task and a `dvc repro --single-item` per stage (same MLflow server; `dvc push` is switched
              off with an override so both sides do the same work)

Both talk to the same PostgreSQL-backed `mlflow server`; the Prefect server is on PostgreSQL too.
Then both run again with everything up to date, which isolates the fixed cost per run.

For the deployment it reports the time from `prefect deployment run` to the Completed state seen
through the API (what a user waits for, worker pick-up included) and the flow run's own start-to-end
time as the server recorded it. Run from the repository root, with PostgreSQL at
$LLMOPS_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test):

    .venv/bin/python benchmarks/bench_orchestration.py

Prints a markdown table and writes benchmarks/results/orchestration.json (gitignored).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from llmops.common.env import OFFLINE as OFFLINE_ENV  # noqa: E402  (importing it sets the offline environment the CLI runs with)

os.environ.update(OFFLINE_ENV)
os.environ["LLMOPS_PROGRESS"] = "0"  # no progress bars in either side's output

from tests.helpers import BIN, make_repo, sh  # noqa: E402
from tests.integration.servers import POOL, postgres_unreachable, postgres_url, running_stack  # noqa: E402

RUN_TIMEOUT_S = 1800


def server_seconds(flow_run: dict) -> float:
    start, end = (datetime.fromisoformat(flow_run[k].replace("Z", "+00:00")) for k in ("start_time", "end_time"))
    return (end - start).total_seconds()


def dvc_repro(stack, repo: Path) -> float:
    started = time.perf_counter()
    sh(BIN / "dvc", "repro", "tokenize", cwd=repo, env=stack.env, timeout=RUN_TIMEOUT_S)
    return time.perf_counter() - started


def deployment_run(stack, repo: Path, worker) -> tuple[float, float]:
    started = time.perf_counter()
    run_id = stack.run_deployment(repo, "pipeline/pipeline", to_stage="tokenize", overrides=["pipeline.push=false"])
    run = stack.wait_for_end(run_id, RUN_TIMEOUT_S, worker)
    wall = time.perf_counter() - started
    if run["state_type"] != "COMPLETED":
        raise SystemExit(f"deployment run {run_id} ended {run['state_type']}: {run['state']['message']}\n{worker.log.read_text()[-4000:]}")
    return wall, server_seconds(run)


def main() -> None:
    url = postgres_url()
    if reason := postgres_unreachable(url):
        raise SystemExit(f"this benchmark needs PostgreSQL at {url}: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        root = Path(tmp)
        (root / "servers").mkdir()
        with running_stack(root / "servers", url) as stack:
            (root / "a").mkdir()
            (root / "b").mkdir()
            plain = make_repo(root / "a", stack.env, tiny_corpus=False)
            orchestrated = make_repo(root / "b", stack.env, files=("prefect.yaml",), dirs=("tasks", "llmops", "flows"), tiny_corpus=False)
            stack.prefect("work-pool", "create", POOL, "--type", "process", cwd=orchestrated)
            stack.prefect("deploy", "--name", "pipeline", cwd=orchestrated)
            worker = stack.start_worker(orchestrated)
            results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
            for phase in ("cold", "up_to_date"):
                repro_s = dvc_repro(stack, plain)
                wall_s, flow_s = deployment_run(stack, orchestrated, worker)
                results[phase] = {"dvc_repro_s": repro_s, "deployment_wall_s": wall_s, "flow_run_s": flow_s}
                print(f"{phase}: dvc repro {repro_s:.1f} s, deployment {wall_s:.1f} s (flow run {flow_s:.1f} s)", flush=True)
    print("\n| stages ingest→tokenize | dvc repro (s) | deployment, trigger→Completed (s) | flow run start→end (s) | ratio wall/repro | overhead (s) |")
    print("|---|---|---|---|---|---|")
    for phase, label in (("cold", "all stages run (default corpus)"), ("up_to_date", "all up to date")):
        r = results[phase]
        print(f"| {label} | {r['dvc_repro_s']:.1f} | {r['deployment_wall_s']:.1f} | {r['flow_run_s']:.1f} | "
              f"{r['deployment_wall_s'] / r['dvc_repro_s']:.2f}x | {r['deployment_wall_s'] - r['dvc_repro_s']:+.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "orchestration.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
