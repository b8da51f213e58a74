"""quantize's awq scheme on the micro project: an int4 compressed-tensors checkpoint whose activation-aware scales were
folded into the layers before rounding, that transformers loads, scored in the same table as w4a16; an architecture
llm-compressor has no AWQ mappings for fails before any work."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llmops.common.errors import ConfigError
from llmops.common.runner import run_stage
from llmops.params.load import load_params

from .conftest import MICRO_MOE, micro_params, write_params

pytestmark = pytest.mark.training

EVALUATE = {"seq_len": 32, "eval_tokens": 2048, "batch_size": 8, "max_problems": 2}
QUANTIZE = {
    "schemes": ["w4a16", "awq"], "calibration_samples": 16, "calibration_seq_len": 32, "humaneval": False,
    "latency_prompt_tokens": 8, "latency_new_tokens": 8, "latency_repeats": 1,
}
GROUP = 32  # auto group size of the micro model: its in-features are 32 (hidden) and 64 (intermediate)


def params_for(project: Path, **quantize) -> Path:
    # the pretrained micro model stands in for the fine-tuned one: quantize reads whatever paths.finetune_model holds
    sections = micro_params(evaluate=EVALUATE, quantize={**QUANTIZE, **quantize}, paths={"finetune_model": "models/pretrain"})
    return write_params(project, sections)


@pytest.fixture(scope="module")
def quantized(tokenized, tmp_path_factory):
    """The micro project after pretrain and one quantize run with w4a16 and awq (once for this module)."""
    project = tmp_path_factory.mktemp("quantize_awq") / "proj"
    shutil.copytree(tokenized, project)
    cwd = os.getcwd()
    os.chdir(project)
    try:
        params = load_params(params_for(project))
        run_stage("pretrain", params, track=False)
        run_stage("quantize", params, track=False)
    finally:
        os.chdir(cwd)
    return project


def state_dict(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_awq_checkpoint_stores_packed_int4_weights_with_a_scale_and_zero_point_per_group(quantized):
    import torch

    awq, original = quantized / "models" / "quantized" / "awq", state_dict(quantized / "models" / "pretrain")
    config = json.loads((awq / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["type"], weights["symmetric"]) == (4, "int", False)
    assert (weights["strategy"], weights["group_size"]) == ("group", GROUP)
    assert config["config_groups"]["group_0"]["input_activations"] is None and config["ignore"] == ["lm_head"]
    assert "AWQModifier" in (awq / "recipe.yaml").read_text()

    tensors = state_dict(awq)
    linears = [k[: -len(".weight")] for k, v in original.items() if k.endswith("proj.weight")]
    assert len(linears) == 2 * 7  # q k v o gate up down in each of the 2 layers
    for name in linears:
        out_features, in_features = original[f"{name}.weight"].shape
        assert f"{name}.weight" not in tensors  # no dense copy
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (out_features, in_features // 8)  # 8 int4 per int32
        assert tensors[f"{name}.weight_scale"].shape == (out_features, in_features // GROUP)
        assert tensors[f"{name}.weight_zero_point"].numel() > 0  # asymmetric: a zero point per group
    assert sum(v.numel() * v.element_size() for k, v in tensors.items() if "proj" in k) < 0.3 * sum(
        original[f"{name}.weight"].numel() * original[f"{name}.weight"].element_size() for name in linears
    )


def test_awq_folds_its_activation_scales_into_the_norms_that_plain_int4_leaves_alone(quantized):
    original = state_dict(quantized / "models" / "pretrain")
    awq, w4a16 = state_dict(quantized / "models" / "quantized" / "awq"), state_dict(quantized / "models" / "quantized" / "w4a16")
    norms = [k for k in original if k.endswith("layernorm.weight")]
    assert len(norms) == 4
    assert all(w4a16[k].equal(original[k]) for k in norms)  # GPTQ rounds the linear layers only
    changed = [k for k in norms if (awq[k] - original[k]).abs().max() > 1e-3 * original[k].abs().max()]
    assert changed, "AWQ left every norm as it was: no scale was applied"


def test_awq_variant_loads_with_transformers_and_undoing_its_scales_gives_back_the_original_layer(quantized):
    import torch
    from transformers import AutoModelForCausalLM

    project = quantized
    model = AutoModelForCausalLM.from_pretrained(str(project / "models" / "quantized" / "awq")).eval()
    original = AutoModelForCausalLM.from_pretrained(str(project / "models" / "pretrain")).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # compressed-tensors decompresses on the first forward
        reference = original(input_ids=ids).logits
        assert torch.isfinite(logits).all() and float((logits - reference).norm() / reference.norm()) < 0.5

        layer, dense = model.model.layers[0], original.model.layers[0]
        scales = dense.input_layernorm.weight / layer.input_layernorm.weight  # AWQ divided the norm by them ...
        dequantized = layer.self_attn.q_proj.weight  # ... and multiplied q/k/v's input columns by them
        groups = dequantized.reshape(-1, GROUP)  # one scale and zero point per group: at most 2**4 levels in each
        assert max(len(set(group.tolist())) for group in groups) <= 16
        q_proj = dense.self_attn.q_proj.weight
        error, unscaled_error = (float((w - q_proj).norm() / q_proj.norm()) for w in (dequantized / scales, dequantized))
    assert 1e-3 < error < 0.5  # really rounded, and the same layer once the scales are undone
    assert unscaled_error > error  # the stored weights carry the scales


def test_awq_perplexity_is_within_the_params_tolerance_and_its_row_is_in_the_variants_table(quantized):
    project = quantized
    metrics = json.loads((project / "metrics" / "quantize.json").read_text())
    tolerance = load_params(project / "params.yaml").quantize.max_perplexity_increase
    base, awq = metrics["unquantized"], metrics["awq"]
    assert awq["perplexity"] <= base["perplexity"] * (1 + tolerance), (base["perplexity"], awq["perplexity"])
    assert awq["within_tolerance"] is True and awq["quantize_seconds"] > 0
    assert awq["size_mb"] < base["size_mb"] and awq["size_ratio"] > 1
    assert metrics["calibration"]["w4a16_group_size"] == GROUP

    rows = [line.split("\t") for line in (project / "reports" / "quantize" / "variants.tsv").read_text().splitlines()]
    assert rows[0] == ["scheme", "perplexity", "size_mb", "ms_per_token"]
    assert [row[0] for row in rows[1:]] == ["unquantized", "w4a16", "awq"]
    assert float(rows[3][1]) == pytest.approx(awq["perplexity"])
    table = (project / "reports" / "quantize" / "table.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == ["unquantized", "w4a16", "awq"]
    assert sorted(p.name for p in (project / "models" / "quantized").iterdir() if not p.name.startswith(".")) == ["awq", "w4a16"]


def test_awq_on_an_architecture_without_awq_mappings_fails_before_any_output(project, monkeypatch):
    from transformers import AutoConfig

    fields = dict(MICRO_MOE)
    AutoConfig.for_model(fields.pop("model_type"), vocab_size=300, **fields).save_pretrained(project / "models" / "pretrain")
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError, match=r"quantize\.schemes.*awq.*no AWQ mappings for MixtralForCausalLM.*LlamaForCausalLM"):
        run_stage("quantize", load_params(params_for(project, schemes=["w8a8", "awq"])), track=False)
    assert not (project / "models" / "quantized").exists() and not (project / "reports" / "quantize").exists()
    assert not (project / "metrics" / "quantize.json").exists()
