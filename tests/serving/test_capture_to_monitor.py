"""Traffic closes the loop: requests a served model with capture on receives become the batches the monitor flow checks,
and the flow's MLflow run records the traffic checks over exactly those requests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from llmops.params.load import load_params
from llmops.serving.backends import inspect_model
from llmops.serving.server import serving

from ..helpers import BIN, ROOT, subprocess_env
from ..monitor.conftest import monitored, project  # noqa: F401  (the monitored micro project: reference stats and a model)
from .conftest import API_KEY, SERVE_OVERRIDES

pytestmark = [pytest.mark.integration, pytest.mark.training]

PROMPTS = [f"def window_{i}(values, size):\n    return [values[j : j + size] for j in range(len(values) - size + {i})]" for i in range(8)]
# The daily monitor deployment's code path: the flow over every capture batch, as Prefect runs it (own PREFECT_HOME).
MONITOR_FLOW = (
    "import json, sys\n"
    "from flows.monitor import monitor\n"
    "out = monitor(batch='data/incoming/*.jsonl', retrain=False, repo_dir=sys.argv[1])\n"
    "print(json.dumps({k: out[k] for k in ('skipped', 'batch_id', 'mlflow_run_id')}))\n"
)


@pytest.fixture
def served_traffic(project, micro_model, tmp_path) -> Path:  # noqa: F811
    """The project served with capture on (batches of ~2 records under data/incoming), sent PROMPTS by the OpenAI client."""
    from openai import OpenAI

    params = yaml.safe_load((project / "params.yaml").read_text())
    params.setdefault("serve", {}).update(SERVE_OVERRIDES, capture=True, capture_dir="data/incoming", capture_max_bytes=700)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cfg = load_params(project / "params.yaml").serve
    with serving(inspect_model(micro_model, "micro"), cfg, "transformers", API_KEY, log_dir=tmp_path / "logs", cwd=project, model_version="7") as server:
        client = OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)
        for prompt in PROMPTS:
            client.completions.create(model="micro", prompt=prompt, max_tokens=3)
    return project


def test_the_monitor_flow_checks_the_captured_batches_and_records_a_run_over_exactly_those_requests(served_traffic, tmp_path):
    import mlflow

    repo = served_traffic
    batches = sorted((repo / "data" / "incoming").glob("capture-*.jsonl"))
    texts = [json.loads(line)["text"] for path in batches for line in path.read_text().splitlines()]
    assert len(batches) >= 2 and sorted(texts) == sorted(PROMPTS), [p.name for p in batches]

    env = subprocess_env(tmp_path) | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([str(BIN / "python"), "-c", MONITOR_FLOW, str(repo)], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    [answer] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert not answer["skipped"] and answer["mlflow_run_id"]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("llmops-monitor").experiment_id])
    assert run.info.run_id == answer["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["llmops.batch"] == "data/incoming/*.jsonl" and run.data.tags["llmops.batch_id"] == answer["batch_id"]
    metrics = run.data.metrics
    assert (metrics["traffic_requests"], metrics["traffic_answered"], metrics["traffic_refused"]) == (len(PROMPTS), len(PROMPTS), 0)
    assert metrics["refused_share"] == 0.0 and metrics["docs"] == len(PROMPTS)
    saved = json.loads((repo / "metrics" / "monitor.json").read_text())
    assert saved["traffic_requests"] == len(PROMPTS) and saved["checks"]["refused_share"]["score"] == 0.0
    assert saved["checks"]["prompt_length_ks"]["score"] is None, "no training prompts in this repo: said, not scored"
