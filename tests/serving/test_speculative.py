"""Speculative decoding: greedy output is identical with and without the draft (lossless), the acceptance counter reads
transformers' own verification, `serve.speculative` resolves and checks the draft, the vLLM and CPU backend command
lines carry it, and the CPU backend serves with it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmops.common.errors import ServeError
from llmops.params.load import load_params
from llmops.params.serve import ServeConfig
from llmops.serving.backends import ServedModel, draft_dir, inspect_model, transformers_command, vllm_command, with_draft
from llmops.serving.speculative import AcceptanceCounter, compare, configure_draft, greedy

from .conftest import API_KEY, build_micro_model, write_project

PROMPTS = [[5, 17, 42, 9], [100, 3, 250, 7, 7, 19, 64], [1, 2, 3], [299, 150, 12, 80, 33], [60, 61, 62, 63, 64, 65, 66, 67]]


def models():
    """A random micro Llama (the target) and its 2-layer drop_layers student (a draft that agrees on some tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmops.training.distill import init_student

    from ..helpers import MICRO

    fields = {k: v for k, v in MICRO.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", vocab_size=300, eos_token_id=299, **{**fields, "num_hidden_layers": 4})
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_config(config).eval()
    draft = init_student(target, 2, "drop_layers").eval()
    configure_draft(draft, 3)
    return target, draft


@pytest.mark.unit
def test_greedy_output_is_identical_with_and_without_the_draft():
    target, draft = models()
    run = compare(target, draft, PROMPTS, 16, eos_token_id=None)
    assert run.identical == len(PROMPTS) and run.mismatched == []
    assert run.metrics()["lossless"] is True and run.new_tokens == 16 * len(PROMPTS)
    assert run.counter.drafted > 0 and run.counter.rounds > 0


@pytest.mark.unit
def test_a_draft_that_is_the_target_itself_has_every_token_accepted():
    import copy

    target, _ = models()
    twin = copy.deepcopy(target)
    configure_draft(twin, 4)
    counter = AcceptanceCounter()
    with counter.counting(target):
        out = greedy(target, PROMPTS[1], 20, draft=twin)
    assert out == greedy(target, PROMPTS[1], 20)
    assert counter.drafted > 0 and counter.accepted == counter.drafted and counter.acceptance_rate == 1.0
    assert "_get_candidate_generator" not in target.__dict__, "the counter is removed from the model on exit"


@pytest.mark.unit
def test_vllm_command_passes_the_draft_as_speculative_config(tmp_path):
    cfg = ServeConfig(num_speculative_tokens=3)
    model = ServedModel(path=tmp_path / "teacher", name="code", draft=tmp_path / "student")
    argv = vllm_command(model, cfg, tmp_path / "sock")
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"model": str(tmp_path / "student"), "num_speculative_tokens": 3, "method": "draft_model"}
    assert argv[2] == str(tmp_path / "teacher")
    assert "--speculative-config" not in vllm_command(ServedModel(path=tmp_path / "teacher", name="code"), cfg, tmp_path / "sock")


@pytest.mark.unit
def test_cpu_backend_command_passes_the_draft(tmp_path):
    cfg = ServeConfig(num_speculative_tokens=5)
    argv = transformers_command(ServedModel(path=tmp_path / "t", name="code", draft=tmp_path / "d"), cfg, tmp_path / "sock")
    assert argv[argv.index("--draft") + 1] == str(tmp_path / "d") and argv[argv.index("--num-speculative-tokens") + 1] == "5"
    assert "--draft" not in transformers_command(ServedModel(path=tmp_path / "t", name="code"), cfg, tmp_path / "sock")


@pytest.fixture
def project_params(tmp_path):
    return load_params(write_project(tmp_path / "proj") / "params.yaml")


@pytest.mark.unit
def test_serve_speculative_names_off_the_distilled_student_or_a_directory(project_params):
    paths = project_params.paths
    assert draft_dir("off", paths) is None and draft_dir("", paths) is None
    assert draft_dir("distill", paths) == paths.student_model
    assert draft_dir("models/other", paths) == paths.root / "models/other"
    assert draft_dir("/abs/draft", paths) == Path("/abs/draft")


@pytest.mark.unit
def test_with_draft_checks_the_draft_exists_and_shares_the_tokenizer(micro_model, project_params, tmp_path):
    served = inspect_model(micro_model, "micro")
    assert with_draft(served, ServeConfig(), project_params.paths) is served
    with pytest.raises(ServeError, match="Run the distill stage first"):
        with_draft(served, ServeConfig(speculative="distill"), project_params.paths)
    student = project_params.paths.student_model
    shutil.copytree(micro_model, student)
    assert with_draft(served, ServeConfig(speculative="distill"), project_params.paths).draft == student.resolve()
    other = tmp_path / "other"
    shutil.copytree(micro_model, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zzz_extra"] = len(tokenizer["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ServeError, match="does not share the served model's tokenizer"):
        with_draft(served, ServeConfig(speculative=str(other)), project_params.paths)


@pytest.mark.integration
def test_cpu_backend_with_a_draft_serves_the_same_greedy_completion(micro_model, tmp_path, monkeypatch):
    """The served model (4 layers) with its 2-layer drop_layers student as draft answers as the model alone would."""
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops.serving.server import serving
    from llmops.training.distill import init_student

    target_dir = tmp_path / "target"
    build_micro_model(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir)
    torch.manual_seed(1)
    deep = AutoModelForCausalLM.from_config(type(target.config).from_dict({**target.config.to_dict(), "num_hidden_layers": 4}))
    deep.save_pretrained(target_dir)  # a 4-layer target in place of the 2-layer one, same tokenizer
    draft_dir_ = tmp_path / "draft"
    init_student(deep, 2, "drop_layers").save_pretrained(draft_dir_)
    shutil.copy(target_dir / "tokenizer.json", draft_dir_ / "tokenizer.json")
    shutil.copy(target_dir / "tokenizer_config.json", draft_dir_ / "tokenizer_config.json")

    project = write_project(tmp_path / "proj", speculative=str(draft_dir_), num_speculative_tokens=3)
    monkeypatch.chdir(project)
    monkeypatch.setenv("LLMOPS_API_KEY", API_KEY)
    params = load_params(project / "params.yaml")
    served = with_draft(inspect_model(target_dir, "micro"), params.serve, params.paths)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompts = ["def add(a, b):\n    ", "import json\n\n\ndef load(path):\n"]
    expected = [tokenizer.decode(greedy(deep.eval(), tokenizer(p)["input_ids"], 12, eos_token_id=tokenizer.eos_token_id), skip_special_tokens=True) for p in prompts]
    with serving(served, params.serve, "transformers", API_KEY, log_dir=project / "logs") as server:
        assert "--draft" in server.command
        client = OpenAI(base_url=server.openai_base_url, api_key=API_KEY, max_retries=0)
        got = [client.completions.create(model="micro", prompt=p, max_tokens=12, temperature=0.0).choices[0].text for p in prompts]
        stream = client.chat.completions.create(model="micro", messages=[{"role": "user", "content": prompts[0]}], max_tokens=6, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert got == expected
    assert streamed, "a streamed chat completion through assisted generation returned no text"
