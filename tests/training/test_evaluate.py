"""evaluate on the micro project: held-out perplexity tells a trained model from an untrained one, and the stage
writes metrics/eval.json, the samples file and the MLflow table."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llmops.params.load import load_params
from llmops.common.runner import run_stage

from .conftest import micro_params, write_params

pytestmark = pytest.mark.training

EVALUATE = {
    "seq_len": 32, "eval_tokens": 2048, "batch_size": 8, "max_problems": 3, "samples_per_problem": 2, "pass_k": [1, 2, 5],
    "max_new_tokens": 12, "max_pairs": 4, "timeout_s": 3.0, "workers": 2,
}


@pytest.fixture(scope="module")
def finetuned(tokenized, tmp_path_factory) -> Path:
    """The micro project after pretrain and finetune (trained once for this module)."""
    project = tmp_path_factory.mktemp("evaluate") / "proj"
    shutil.copytree(tokenized, project)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        params = load_params(write_params(project, micro_params(evaluate=EVALUATE)))
        run_stage("pretrain", params, track=False)
        run_stage("finetune", params, track=False)
    finally:
        os.chdir(cwd)
    return project


def test_trained_model_has_lower_held_out_perplexity_than_an_untrained_one(finetuned, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    from llmops.evaluation.generation import perplexity
    from llmops.training.data import TokenBlocks, load_token_meta

    monkeypatch.chdir(finetuned)
    meta = load_token_meta(Path("data/tokens"))
    blocks = TokenBlocks(Path("data/tokens/val.bin"), meta["dtype"], 32, seed=None, limit_tokens=2048)
    trained = AutoModelForCausalLM.from_pretrained("models/pretrain").eval()
    set_seed(0)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("models/pretrain")).eval()
    trained_ppl = perplexity(trained, blocks, batch_size=8, desc="trained")
    untrained_ppl = perplexity(untrained, blocks, batch_size=8, desc="untrained")
    assert trained_ppl.tokens == untrained_ppl.tokens == len(blocks) * 31
    # an untrained model is near uniform over the 300-token vocabulary; training must beat it by far
    assert untrained_ppl.perplexity > 150
    assert trained_ppl.perplexity < 0.5 * untrained_ppl.perplexity, (trained_ppl, untrained_ppl)


def test_evaluate_stage_writes_eval_metrics_samples_and_an_mlflow_table(finetuned, monkeypatch, tmp_path):
    import mlflow

    monkeypatch.chdir(finetuned)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_stage("evaluate", load_params(Path("params.yaml")), track=True)
    metrics = json.loads(Path("metrics/eval.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert not Path("metrics/evaluate.json").exists()
    assert metrics["perplexity"]["tokens"] == metrics["base_perplexity"]["tokens"] == (2048 // 32) * 31
    assert 1 < metrics["perplexity"]["perplexity"] < 300
    he = metrics["humaneval"]
    assert he["problems"] == 3 and he["samples_per_problem"] == 2 and he["sandboxed"] is True
    assert {"pass_at_1", "pass_at_2"} <= set(he) and "pass_at_5" not in he  # only k <= n
    assert 0 <= he["pass_at_1"] <= he["pass_at_2"] <= 1
    assert he["samples_passed"] + he["samples_failed"] + he["samples_timed_out"] == 6
    assert he["generation_seconds"] > 0 and he["execution_seconds"] > 0
    ins = metrics["instructions"]
    assert ins["pairs"] == 4
    assert 0 <= ins["syntax_valid_rate"] <= 1 and 0 <= ins["exact_match"] <= 1 and 0 <= ins["fuzzy_match"] <= 1

    rows = [json.loads(line) for line in Path("reports/evaluate/samples.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["humaneval"] * 6 + ["instructions"] * 4
    assert {r["task"] for r in rows[:6]} == {"HumanEval/0", "HumanEval/1", "HumanEval/2"}
    assert all({"task", "prompt", "output", "passed", "status"} <= set(r) for r in rows)
    assert sum(r["passed"] for r in rows[:6]) == he["samples_passed"]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{finetuned / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("llmops").experiment_id
    run = client.search_runs([experiment_id])[0]
    assert run.data.tags["llmops.stage"] == "evaluate"
    assert run.data.metrics["humaneval.pass_at_1"] == he["pass_at_1"]
    assert run.data.metrics["perplexity.perplexity"] == pytest.approx(metrics["perplexity"]["perplexity"])
    assert "eval_samples.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_samples.json", str(tmp_path))).read_text())
    columns = table["columns"]
    assert {"task", "prompt", "output", "passed"} <= set(columns) and len(table["data"]) == 10
    assert table["data"][0][columns.index("task")] == "HumanEval/0"
