"""pretrain on CPU with a micro model: loss goes down, the output loads, resume after SIGKILL, DDP with 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmops.params.load import load_params
from llmops.common.errors import ConfigError, DataError
from llmops.common.runner import run_stage
from llmops.training.runtime import COMPLETE_MARKER, last_complete_checkpoint

from ..conftest import ROOT
from .conftest import kill_after_checkpoint, llmops, micro_params, write_params

pytestmark = pytest.mark.training


def metrics_of(project: Path, stage: str) -> dict:
    return json.loads((project / "metrics" / f"{stage}.json").read_text())


def test_pretrain_reduces_loss_and_writes_a_model_transformers_loads(project, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(project)
    result = run_stage("pretrain", load_params(write_params(project, micro_params(train={"eval_every": 10}))), track=False)
    m = result.metrics
    history = json.loads((project / "models/pretrain/training_summary.json").read_text())["metrics"]
    assert history["steps"] == m["steps"] == 40
    # a 300-token vocabulary starts at ln(300) = 5.7 nats; the micro model must learn well below that
    assert m["train_loss"] < 4.5, m
    assert m["eval_loss"] < 5.0, m
    assert m["tokens"] == 40 * 4 * 32
    assert m["tokens_per_s"] > 0
    assert (project / "reports/pretrain/loss_curve.png").stat().st_size > 1000
    # per-step curves for `dvc plots`: every step's train loss, the held-out loss every train.eval_every steps
    train_curve = (project / "reports/pretrain/train_curve.tsv").read_text().splitlines()
    eval_curve = [line.split("\t") for line in (project / "reports/pretrain/eval_curve.tsv").read_text().splitlines()]
    assert train_curve[0] == "step\tloss\tlr\tgrad_norm" and len(train_curve) == 1 + 40
    assert [int(s) for s, _ in eval_curve[1:]] == [10, 20, 30, 40]
    assert float(eval_curve[-1][1]) == pytest.approx(m["eval_loss"], rel=1e-4)
    assert not any((project / "checkpoints/pretrain").iterdir()), "a finished run leaves no resumable state behind"

    model = AutoModelForCausalLM.from_pretrained(project / "models/pretrain")
    tokenizer = AutoTokenizer.from_pretrained(project / "models/pretrain")
    ids = tokenizer("def load(s):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tokenizer.eos_token_id in out[0].tolist()
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 1


def test_mixture_of_experts_preset_trains(project, monkeypatch):
    monkeypatch.chdir(project)
    params = micro_params(pretrain={"preset": "micro-moe", "token_budget": 4 * 32 * 6})
    result = run_stage("pretrain", load_params(write_params(project, params)), track=False)
    config = json.loads((project / "models/pretrain/config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    assert result.metrics["steps"] == 6
    # only top-2 of 4 experts run per token: fewer FLOPs per token than all the parameters imply
    assert result.metrics["flops_per_token"] < 6 * result.metrics["non_embedding_parameters"]


def test_tokens_made_with_another_tokenizer_are_refused(project, monkeypatch):
    monkeypatch.chdir(project)
    tok = project / "models/tokenizer/tokenizer_config.json"
    tok.write_text(tok.read_text().replace("}", ', "x": 1}', 1))
    with pytest.raises(DataError, match="another tokenizer"):
        run_stage("pretrain", load_params(write_params(project, micro_params())), track=False)


def test_unknown_preset_names_the_choices(project):
    params = micro_params(pretrain={"preset": "huge"})
    with pytest.raises(ConfigError, match="huge.*micro"):
        load_params(write_params(project, params))


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    run_dir = tmp_path / "run"
    for step in (10, 20, 30):
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
    (run_dir / "checkpoint-10" / COMPLETE_MARKER).write_text("{}")
    (run_dir / "checkpoint-20" / COMPLETE_MARKER).write_text("{}")
    assert last_complete_checkpoint(run_dir).name == "checkpoint-20"
    assert not (run_dir / "checkpoint-30").exists(), "a checkpoint killed mid-save is removed"


def test_sigkill_mid_run_then_rerun_resumes_and_matches_an_uninterrupted_run(tokenized, tmp_path):
    import shutil

    params = micro_params(pretrain={"token_budget": 4 * 32 * 120}, train={"save_every": 10, "seed": 0, "device": "cpu"})
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for proj in (straight, killed):
        shutil.copytree(tokenized, proj)
        write_params(proj, params)
    llmops(straight, "stage", "pretrain", "--no-track")
    expected = metrics_of(straight, "pretrain")
    assert expected["resumed_from_step"] == 0

    kill_after_checkpoint(killed, "pretrain", 20, timeout_s=240)
    assert not (killed / "models/pretrain").exists(), "a killed run leaves no output that looks finished"
    assert not (killed / "metrics/pretrain.json").exists()

    llmops(killed, "stage", "pretrain", "--no-track")
    resumed = metrics_of(killed, "pretrain")
    assert resumed["resumed_from_step"] >= 20
    assert resumed["steps"] == expected["steps"] == 120
    assert resumed["tokens"] == expected["tokens"]
    assert resumed["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-3)
    assert resumed["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-3)


def test_two_process_ddp_on_gloo_matches_one_process_under_torchrun_and_accelerate(tokenized, tmp_path):
    import shutil

    runs = {
        "single": {"batch_size": 8},
        "torchrun": {"batch_size": 4, "launcher": {"launcher": "torchrun", "nproc_per_node": 2, "device": "cpu"}},
        "accelerate": {
            "batch_size": 4,
            "launcher": {"launcher": "accelerate", "nproc_per_node": 2, "device": "cpu", "accelerate_config": str(ROOT / "infra/accelerate/ddp.yaml")},
        },
    }
    results = {}
    for name, spec in runs.items():
        proj = tmp_path / name
        shutil.copytree(tokenized, proj)
        # same global batch (8 blocks per step): one process with 8, or two with 4 each
        write_params(proj, micro_params(pretrain={"batch_size": spec["batch_size"], "token_budget": 8 * 32 * 30}, train=spec.get("launcher", {})))
        llmops(proj, "stage", "pretrain", "--no-track", timeout=600)
        results[name] = metrics_of(proj, "pretrain")
        assert (proj / "models/pretrain/model.safetensors").exists()
    one = results["single"]
    assert one["processes"] == 1 and one["steps"] == 30
    for name in ("torchrun", "accelerate"):
        two = results[name]
        assert two["processes"] == 2, name
        assert two["steps"] == one["steps"] and two["tokens"] == one["tokens"], name
        assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=0.02), name
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=0.02), name


def test_gradient_checkpointing_changes_memory_not_results(tokenized, tmp_path, monkeypatch):
    import shutil

    losses = {}
    for flag in (False, True):
        proj = tmp_path / f"gc-{flag}"
        shutil.copytree(tokenized, proj)
        monkeypatch.chdir(proj)
        params = micro_params(pretrain={"token_budget": 4 * 32 * 8}, train={"gradient_checkpointing": flag, "device": "cpu"})
        losses[flag] = run_stage("pretrain", load_params(write_params(proj, params)), track=False).metrics
    assert losses[True]["steps"] == losses[False]["steps"] == 8
    assert losses[True]["eval_loss"] == pytest.approx(losses[False]["eval_loss"], abs=1e-4)
