"""Screenshots of the MLflow pages the README's tour walks through, taken with headless Chromium.

Run after `make run` (or any `llmops run`) in the repository whose store it should show:

    sudo apt-get install -y chromium                     # Debian's package; any Chromium or Chrome works (--chromium)
    .venv/bin/python docs/tour/screenshots.py             # writes docs/tour/*.png
    .venv/bin/python docs/tour/screenshots.py --repo /path/to/clone --out /tmp/shots

It starts `llmops ui` on a free port (the project's own store: params.yaml's tracking.uri), finds the experiment,
the newest pipeline run, the registered model and its quantized variants through the MLflow client, and saves one
PNG per page:

  1-runs.png          the llmops experiment's training runs filtered to the pipeline rows, ranked by quality.pass_at_1
  2-pipeline-run.png  the newest pipeline run: description (the headline table), metrics, nested stage runs
  3-compare.png       the pipeline runs side by side (MLflow's compare view)
  4-models.png        the registered model with its versions and aliases
  5-variants.png      the register run's nested register-<scheme> runs compared: fp16 vs its quantized variants
  6-training.png      the pretrain run's charts (loss, eval_loss, lr per step)

and, with `--prefect`, starts `prefect server` on the same local database the run used (PREFECT_HOME) and saves

  7-prefect-runs.png  the flow runs
  8-prefect-run.png   the newest `pipeline` flow run: one task run per stage, its summary in the logs

Each page gets `--wait-ms` of Chromium's virtual time to render (MLflow's UI loads its data after the page).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIPELINE_FILTER = "tags.`llmops.pipeline` = 'true'"  # the pipeline rows only (what the README's tour types into the search box)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout_s:.0f} s")


def pages(repo: Path) -> dict[str, str]:
    """Page name -> the UI's hash route, from what the store holds."""
    sys.path.insert(0, str(repo))
    import mlflow

    from llmops.params.load import load_params

    params = load_params(repo / "params.yaml")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(repo / uri.removeprefix('sqlite:///')).resolve()}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {params.tracking.experiment!r} in {uri}: run `make run` first")
    eid = experiment.experiment_id
    parents = client.search_runs([eid], "tags.`llmops.pipeline` = 'true'", order_by=["attributes.start_time DESC"])
    if not parents:
        raise SystemExit(f"no pipeline run in experiment {eid}")
    stage = {r.data.tags.get("llmops.stage"): r for r in client.search_runs([eid], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")}
    order = urllib.parse.quote("metrics.`quality.pass_at_1`")
    out = {
        "1-runs": f"/experiments/{eid}/runs?searchFilter={urllib.parse.quote(PIPELINE_FILTER)}&orderByKey={order}&orderByAsc=false",
        "2-pipeline-run": f"/experiments/{eid}/runs/{parents[0].info.run_id}",
        "3-compare": "/compare-runs?" + urllib.parse.urlencode(
            {"runs": json.dumps([r.info.run_id for r in parents[:5]]), "experiments": json.dumps([eid])}
        ),
        "4-models": f"/models/{params.register.model_name}",
    }
    variants = client.search_runs([eid], "attributes.run_name LIKE 'register-%'", order_by=["attributes.start_time DESC"], max_results=4)
    if variants:
        out["5-variants"] = "/compare-runs?" + urllib.parse.urlencode({"runs": json.dumps([r.info.run_id for r in variants]), "experiments": json.dumps([eid])})
    if "pretrain" in stage:
        out["6-training"] = f"/experiments/{eid}/runs/{stage['pretrain'].info.run_id}/model-metrics"
    return out


def prefect_pages(api: str) -> dict[str, str]:
    """The Prefect UI's flow-run list and the newest `pipeline` flow run (its id from the server's REST API)."""
    body = json.dumps({"sort": "START_TIME_DESC", "limit": 20}).encode()
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.load(response)
    flows = {}
    for run in runs:
        if run["flow_id"] not in flows:
            with urllib.request.urlopen(f"{api}/flows/{run['flow_id']}", timeout=30) as response:
                flows[run["flow_id"]] = json.load(response)["name"]
    pipeline = next((r for r in runs if flows[r["flow_id"]] == "pipeline"), None)
    out = {"7-prefect-runs": "/runs"}
    if pipeline:
        out["8-prefect-run"] = f"/runs/flow-run/{pipeline['id']}"
    return out


def shoot(chromium: str, url: str, png: Path, size: str, wait_ms: int) -> None:
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
           f"--virtual-time-budget={wait_ms}", f"--screenshot={png}", url]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=wait_ms / 1000 + 90)
    print(f"{png}  <- {url}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=HERE.parents[1])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome") or "chromium")
    ap.add_argument("--size", default="1920,1080", help="window width,height")
    ap.add_argument("--wait-ms", type=int, default=20000)
    ap.add_argument("--prefect", action="store_true", help="also the Prefect UI (starts `prefect server` on PREFECT_HOME's database)")
    args = ap.parse_args()
    repo = args.repo.resolve()
    targets = pages(repo)
    port = free_port()
    llmops = repo / ".venv" / "bin" / "llmops"
    ui = subprocess.Popen([str(llmops if llmops.exists() else "llmops"), "ui", "--port", str(port)], cwd=repo, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", 120)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, route in targets.items():
            shoot(args.chromium, f"{base}/#{route}", args.out / f"{name}.png", args.size, args.wait_ms)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
    if args.prefect:
        prefect_port = free_port()
        prefect = repo / ".venv" / "bin" / "prefect"
        ui_api = {"PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api"}  # the UI's own default is port 4200
        server = subprocess.Popen([str(prefect if prefect.exists() else "prefect"), "server", "start", "--port", str(prefect_port)], cwd=repo,
                                  env=os.environ | ui_api, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            base = f"http://127.0.0.1:{prefect_port}"
            wait_http(base + "/api/health", 180)
            for name, route in prefect_pages(base + "/api").items():
                shoot(args.chromium, base + route, args.out / f"{name}.png", args.size, args.wait_ms)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)

if __name__ == "__main__":
    main()
