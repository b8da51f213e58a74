"""The trigger path on a tiny corpus: checking a flagged batch leaves the training data as it was; `llmops monitor` then
makes it a training source, the pipeline re-runs, and the new model goes through the gate."""

import json
from pathlib import Path

import pytest
import yaml

from tasks import monitor
from tasks.common.config import load_params

from ..conftest import write_jsonl
from ..helpers import BIN, make_repo, sh, subprocess_env
from .conftest import PROSE

pytestmark = pytest.mark.e2e


def lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


def test_a_flagged_batch_is_retrained_on_and_the_new_model_is_gated(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = subprocess_env(tmp_path)
    repo = make_repo(tmp_path, env)
    monkeypatch.chdir(repo)  # the in-process check resolves the registry against the working directory, as the CLI does
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["monitor"].update(perplexity_tokens=2048)
    params["evaluate"].update(max_problems=0, compare_base=False, max_pairs=1)  # the gate needs perplexity only: keep the retrain short
    params["register"].update(log_transformers_flavor=False)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(BIN / "llmops", "run", "--to", "tokenize", cwd=repo, env=env)
    before = lock_outs(repo)
    batch = write_jsonl(repo / "incoming" / "prose.jsonl", [{"id": f"prose/{i}", "text": t} for i, t in enumerate(PROSE)])

    recorded = monitor.run(load_params(repo / "params.yaml"), "incoming/prose.jsonl", root=repo, track=False)
    assert recorded.drift
    assert lock_outs(repo) == before
    status = sh(BIN / "dvc", "status", "--with-deps", "tokenize", cwd=repo, env=env)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout

    retrained = sh(BIN / "llmops", "monitor", "--batch", str(batch.relative_to(repo)), cwd=repo, env=env, timeout=900)
    console = " ".join(retrained.stderr.split())
    assert "retrained via subflow" in console
    after = lock_outs(repo)
    assert after["data/raw"] != before["data/raw"], "the batch became a new data version"
    sources = yaml.safe_load((repo / "params.yaml").read_text())["ingest"]["source"]
    assert isinstance(sources, list) and any(s.startswith("data/batches/") for s in sources)
    assert (repo / f"{sources[-1]}.dvc").exists(), "the batch copy is versioned by DVC"
    assert json.loads((repo / "metrics" / "ingest.json").read_text())["docs"] >= len(PROSE) + 3
    register = json.loads((repo / "metrics" / "register.json").read_text())
    assert register["decision"] == "promoted" and register["reasons"], register  # the gate ran: no champion yet, so it wins

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    [flagged] = client.search_runs([client.get_experiment_by_name("llmops-monitor").experiment_id])
    tags = flagged.data.tags
    assert tags["llmops.retrain.mode"] == "subflow"
    pipeline_run = client.get_run(tags["llmops.retrain.mlflow_run_id"])
    assert pipeline_run.data.tags["llmops.stage.register"] == "ran"
    versions = client.search_model_versions("name = 'llmops-code'")
    assert [v.version for v in versions] == [register["version"]]
    assert client.get_registered_model("llmops-code").aliases.get("champion") == versions[0].version
    assert tags["llmops.retrain.champion"] == f"None -> {versions[0].version}"
