"""finetune: docstring -> body pairs, bad JSONL quarantined, LoRA trains only the adapter and merges to a standalone model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llmops.params.load import load_params
from llmops.common.runner import run_stage
from llmops.training.instructions import CHAT_TEMPLATE, CODE_TEMPLATE, docstring_pairs, read_jsonl_pairs

from ..conftest import write_jsonl
from .conftest import llmops, micro_params, write_params

pytestmark = pytest.mark.training

SOURCE = '''import os


def plain(x):
    return x


class Box:
    def size(self, scale=1):
        """How big the box is.

        Scaled by `scale`.
        """
        # a comment before the body
        return self.n * scale

    async def fetch(self):
        """Only a docstring: no body to learn."""


@decorated
def top(a,
        b):
    """Add two things."""
    total = a + b
    return total
'''


def test_docstring_pairs_split_signature_and_docstring_from_the_body():
    pairs = {p.id.split("::")[1]: p for p in docstring_pairs("pkg/mod.py", SOURCE)}
    assert set(pairs) == {"size:9", "top:22"}, "functions without a docstring or without a body give no pair"
    size = pairs["size:9"]
    assert size.source == "pkg/mod.py"
    prompt, response = size.messages[0]["content"], size.messages[1]["content"]
    assert prompt == 'def size(self, scale=1):\n    """How big the box is.\n\n    Scaled by `scale`.\n    """\n'
    assert response == "    # a comment before the body\n    return self.n * scale\n"
    top = pairs["top:22"]
    assert top.messages[0]["content"] == 'def top(a,\n        b):\n    """Add two things."""\n'
    assert top.messages[1]["content"] == "    total = a + b\n    return total\n"
    assert list(docstring_pairs("bad.py", "def broken(:\n")) == [], "unparsable text yields nothing (it is not Python)"


BAD_ROWS = [
    '{"prompt": "p1", "response": "r1"}',
    "{not json",
    '["a", "list"]',
    '{"prompt": "only a prompt"}',
    '{"prompt": "  ", "response": "r"}',
    '{"messages": [{"role": "user", "content": "hi"}]}',
    '{"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}',
    '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
]


def test_bad_instruction_rows_are_quarantined_with_file_line_and_rule(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", BAD_ROWS)
    pairs, rejected = read_jsonl_pairs(path)
    assert [p.messages[-1]["content"] for p in pairs] == ["r1", "a"]
    where = {r.where.rsplit(":", 1)[1]: r.rule for r in rejected}
    assert set(where) == {"2", "3", "4", "5", "6", "7"}
    assert "not valid JSON" in where["2"]
    assert "JSON object" in where["3"]
    assert "'prompt' and 'response'" in where["4"]
    assert "empty" in where["5"]
    assert "last message" in where["6"]
    assert "messages[0]" in where["7"]
    assert all(r.where.startswith(str(path)) for r in rejected)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pretrained(project, monkeypatch) -> Path:
    monkeypatch.chdir(project)
    run_stage("pretrain", load_params(write_params(project, micro_params(pretrain={"token_budget": 4 * 32 * 20}))), track=False)
    return project


def test_lora_trains_only_the_adapter_and_merges_into_a_standalone_model(pretrained):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project = pretrained
    base_weights = sha256(project / "models/pretrain/model.safetensors")
    result = run_stage("finetune", load_params(write_params(project, micro_params(finetune={"method": "lora", "max_steps": 15, "epochs": 5}))), track=False)
    m = result.metrics
    assert m["method"] == "lora" and m["steps"] == 15
    assert 0 < m["trainable_parameters"] < m["parameters"] / 2
    assert m["eval_loss"] < m["eval_loss_before"], "fine-tuning must lower the loss on held-out responses"
    assert sha256(project / "models/pretrain/model.safetensors") == base_weights, "the base model is never modified"

    train_rows = [json.loads(line) for line in (project / "data/instructions/train.jsonl").open()]
    eval_rows = [json.loads(line) for line in (project / "data/instructions/eval.jsonl").open()]
    assert train_rows and eval_rows
    assert not {r["source"] for r in train_rows} & {r["source"] for r in eval_rows}, "no source file on both sides"

    adapter = project / "models/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert keys and all("lora_" in k for k in keys), keys[:5]
        assert sum(f.get_tensor(k).numel() for k in keys) == m["trainable_parameters"]

    merged = AutoModelForCausalLM.from_pretrained(project / "models/finetune")
    assert not any("lora" in name for name, _ in merged.named_parameters()), "the merged model needs no peft"
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(project / "models/pretrain"), adapter)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter.eval()(ids).logits, rtol=1e-4, atol=1e-4)

    tokenizer = AutoTokenizer.from_pretrained(project / "models/finetune")
    assert tokenizer.chat_template == CODE_TEMPLATE
    prompt = train_rows[0]["messages"][0]["content"]
    assert tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True) == prompt


def test_full_finetune_on_user_jsonl_with_chat_template_quarantines_bad_rows(pretrained):
    from transformers import AutoTokenizer

    project = pretrained
    good = [{"prompt": f"question {i}: what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    long_row = {"prompt": "x " * 400, "response": "too long"}
    rows = [*(json.dumps(r) for r in good[:20]), "{broken", json.dumps(long_row), *(json.dumps(r) for r in good[20:])]
    data = write_jsonl(project / "user_pairs.jsonl", rows)
    params = micro_params(finetune={"method": "full", "data": str(data), "template": "chat", "packing": False, "max_steps": 8, "epochs": 3})
    result = run_stage("finetune", load_params(write_params(project, params)), track=False)
    m = result.metrics
    assert m["method"] == "full" and m["trainable_parameters"] == m["parameters"]
    assert m["pairs"]["train"] + m["pairs"]["eval"] == 40
    assert m["pairs"]["quarantined"] == 2
    quarantine = [json.loads(line) for line in (project / "data/instructions/quarantine.jsonl").open()]
    rules = {q["where"]: q["rule"] for q in quarantine}
    assert "not valid JSON" in rules[f"{data}:21"]
    assert any("too long" in rule and "max_seq_len=256" in rule for rule in rules.values())
    assert (project / "models/adapter/none.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(project / "models/finetune")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nhi\n<|assistant|>\n"


def test_model_base_skips_pretrain_and_finetunes_the_given_model(pretrained, tmp_path):
    import shutil

    project = pretrained
    base = tmp_path / "my-base"
    shutil.copytree(project / "models/pretrain", base)
    params = micro_params(finetune={"max_steps": 3})
    params["model"] = {"base": str(base)}
    loaded = load_params(write_params(project, params))
    skipped = run_stage("pretrain", loaded, track=False)
    assert skipped.metrics == {"skipped": True}
    assert json.loads((project / "models/pretrain/base.json").read_text())["base"] == str(base)
    result = run_stage("finetune", loaded, track=False)
    assert result.metrics["steps"] == 3
    assert json.loads((project / "models/finetune/training_summary.json").read_text())["base"] == str(base)


def directory_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_with_one_seed_in_two_processes_write_byte_identical_model_directories(tokenized, tmp_path):
    """What DVC hashes must not change between identical runs (timings live in metrics/, not beside the weights), or
    `dvc repro` and `llmops reproduce` would see a new data version where nothing changed. Separate processes, so
    each has its own string hash seed (peft keeps target_modules as a set), one with progress bars and one without
    (the pickled TrainingArguments held that)."""
    import shutil

    params = micro_params(pretrain={"token_budget": 4 * 32 * 10}, finetune={"method": "lora", "max_steps": 3})
    digests = []
    for name, progress in (("first", True), ("second", False)):
        proj = tmp_path / name
        shutil.copytree(tokenized, proj)
        write_params(proj, params)
        llmops(proj, "stage", "pretrain", "--no-track", progress=progress)
        llmops(proj, "stage", "finetune", "--no-track", progress=progress)
        digests.append({d: directory_digests(proj / d) for d in ("models/pretrain", "models/finetune", "models/adapter")})
    first, second = digests
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json"}
    marker = ".llmops-output"  # every stage output carries it (a stage replaces only folders it wrote)
    assert set(first["models/pretrain"]) == {"config.json", "generation_config.json", "model.safetensors", "training_summary.json", marker, *tokenizer_files}
    assert set(first["models/finetune"]) == set(first["models/pretrain"]) | {"chat_template.jinja"}
    assert set(first["models/adapter"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md", "chat_template.jinja", marker, *tokenizer_files}
    assert first == second
    assert json.loads((tmp_path / "first/metrics/pretrain.json").read_text())["tokens_per_s"] > 0, "timings are still reported"
