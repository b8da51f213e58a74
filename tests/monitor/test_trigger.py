"""The trigger path on a tiny corpus, then lineage and reproduce of the model it registered.

Checking a flagged batch leaves the training data as it was; `llmops monitor` then makes the batch a training source,
the pipeline re-runs, and the new model goes through the registry gate. `llmops lineage` follows that version's
links; `llmops reproduce` re-runs it at its commit on its data versions, and names a data version that is gone.
"""

import json
import os
from pathlib import Path

import pytest
import yaml

from llmops.monitoring import drift as monitor
from llmops.params.load import load_params

from ..conftest import write_jsonl
from ..helpers import BIN, make_repo, sh, subprocess_env
from .conftest import PROSE

pytestmark = pytest.mark.e2e


def lock_outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


@pytest.fixture(scope="module")
def retrained(tmp_path_factory):
    """A tiny-corpus repo run to tokenize, a prose batch checked in-process, then `llmops monitor` on it with retraining."""
    root = tmp_path_factory.mktemp("trigger")
    env = subprocess_env(root)
    repo = make_repo(root, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["monitor"].update(perplexity_tokens=2048)
    params["evaluate"].update(max_problems=0, compare_base=False, max_pairs=1)  # the gate needs perplexity only: keep it short
    params["register"].update(log_transformers_flavor=False)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "commit", "-qam", "monitor test params", cwd=repo)
    sh(BIN / "llmops", "run", "--to", "tokenize", cwd=repo, env=env)
    before = lock_outs(repo)
    batch = write_jsonl(repo / "incoming" / "prose.jsonl", [{"id": f"prose/{i}", "text": t} for i, t in enumerate(PROSE)])
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(repo)  # the in-process check resolves the registry against the working directory, as the CLI does
        checked = monitor.run(load_params(repo / "params.yaml"), "incoming/prose.jsonl", track=False)
        untouched = lock_outs(repo) == before, sh(BIN / "dvc", "status", "--with-deps", "tokenize", cwd=repo, env=env).stdout
    out = sh(BIN / "llmops", "monitor", "--batch", str(batch.relative_to(repo)), cwd=repo, env=env, timeout=900)
    return {"repo": repo, "env": env, "root": root, "before": before, "checked": checked, "untouched": untouched, "console": " ".join(out.stderr.split())}


def mlflow_client(repo: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def test_checking_a_flagged_batch_leaves_the_training_data_untouched(retrained):
    assert retrained["checked"].drift
    same_lock, status = retrained["untouched"]
    assert same_lock and "Data and pipelines are up to date" in status, status


def test_a_flagged_batch_is_retrained_on_and_the_new_model_is_gated(retrained):
    repo = retrained["repo"]
    assert "retrained via subflow" in retrained["console"]
    assert lock_outs(repo)["data/raw"] != retrained["before"]["data/raw"], "the batch became a new data version"
    sources = yaml.safe_load((repo / "params.yaml").read_text())["ingest"]["source"]
    assert isinstance(sources, list) and sources[-1].startswith("data/batches/")
    assert (repo / f"{sources[-1]}.dvc").exists(), "the batch copy is versioned by DVC"
    assert json.loads((repo / "metrics" / "ingest.json").read_text())["docs"] >= len(PROSE) + 3
    register = json.loads((repo / "metrics" / "register.json").read_text())
    assert register["decision"] == "promoted" and register["reasons"], register  # the gate ran: no champion yet, so it wins

    client = mlflow_client(repo)
    [flagged] = client.search_runs([client.get_experiment_by_name("llmops-monitor").experiment_id])
    tags = flagged.data.tags
    assert tags["llmops.drift"] == "true" and tags["llmops.retrain.mode"] == "subflow"
    assert client.get_run(tags["llmops.retrain.mlflow_run_id"]).data.tags["llmops.stage.register"] == "ran"
    assert [str(v.version) for v in client.search_model_versions("name = 'llmops-code'")] == [str(register["version"])]
    assert str(client.get_registered_model("llmops-code").aliases.get("champion")) == str(register["version"])
    assert tags["llmops.retrain.champion"] == f"None -> {register['version']}"


def test_lineage_follows_the_champion_to_its_runs_data_versions_commit_and_params(retrained):
    repo, env = retrained["repo"], retrained["env"]
    chain = json.loads(sh(BIN / "llmops", "lineage", "llmops-code@champion", "--json", cwd=repo, env=env).stdout)
    outs = lock_outs(repo)
    assert chain["model"]["aliases"] == ["challenger", "champion", "production"]  # the monitor rolled the new champion out
    assert chain["data"]["data/raw"] == outs["data/raw"] and chain["data"]["data/tokens"] == outs["data/tokens"]
    assert {"ingest", "tokenize", "pretrain", "finetune", "evaluate"} <= set(chain["stage_runs"])
    assert all(r["status"] == "FINISHED" for r in chain["stage_runs"].values())
    assert chain["source"]["git_commit"] == sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    assert chain["pipeline_run"]["status"] == "FINISHED" and chain["metrics"]["perplexity"]
    tree = sh(BIN / "llmops", "lineage", "llmops-code@champion", cwd=repo, env=env).stdout
    assert "data (DVC md5)" in tree and outs["data/tokens"] in tree


def test_reproduce_rebuilds_the_model_at_its_commit_and_matches_every_metric(retrained):
    repo, env = retrained["repo"], retrained["env"]
    out = sh(BIN / "llmops", "reproduce", "llmops-code@champion", cwd=repo, env=env, check=False, timeout=900)
    console = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 0, console[-3000:]
    assert "reproduced:" in console and "NO" not in out.stdout
    assert "eval_loss" in out.stdout and "perplexity.perplexity" in out.stdout
    # CPU training with fixed seeds is deterministic: the same commit and data give the same model directories, byte for
    # byte (DVC md5), not just close metrics
    outs = lock_outs(repo)
    for path in ("models/pretrain", "models/finetune", "models/adapter", "reports/evaluate"):
        assert f"{path}: registered md5 {outs[path]}, reproduced {outs[path]} (bitwise identical)" in console, console[-2000:]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    reran = [o["path"] for stage in ("pretrain", "finetune", "align", "evaluate") for o in lock[stage]["outs"] if not o["path"].startswith("metrics/")]
    assert f"outputs: {len(reran)} of {len(reran)} byte-identical" in console, console[-2000:]
    assert not [p for p in os.listdir(repo.parent) if p.startswith("llmops-reproduce")]


def test_reproduce_names_a_data_version_that_is_gone(retrained):
    repo, env, root = retrained["repo"], retrained["env"], retrained["root"]
    md5 = lock_outs(repo)["data/tokens"]
    for store in (repo / ".dvc" / "cache", root / "remote"):
        (store / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    out = sh(BIN / "llmops", "reproduce", "llmops-code@champion", cwd=repo, env=env, check=False)
    message = " ".join(out.stderr.split())
    assert out.returncode == 1
    assert f"data/tokens md5 {md5}" in message and "dvc push" in message
