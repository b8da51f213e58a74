"""llm-compressor recipes for each scheme the quantize stage offers, and the checks that run before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmops.params.quantize import QuantizeConfig
from llmops.common.errors import ConfigError

IGNORE = ["lm_head"]  # the output head stays dense (it is tied to the embeddings in the default model)
GROUP_SIZES = (128, 64, 32)  # int4 group sizes vLLM's Marlin/Machete kernels run; the largest that fits is picked
AWQ_EXAMPLES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")  # named in awq's ConfigError


def unavailable(scheme: str) -> str | None:
    """Why a scheme cannot run on this machine, or None when it can."""
    import torch

    if scheme == "fp8_dynamic" and not torch.cuda.is_available():
        return "needs a CUDA GPU (FP8 weights run on FP8 tensor cores; no CUDA device here)"
    return None


def meta_model(model_dir: Path) -> Any:
    """The model's modules built from its config alone (meta device: no weights read, no memory taken)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def quantized_in_features(model_dir: Path) -> dict[str, int]:
    """In-features of every Linear layer a recipe quantizes (all but IGNORE), from the config alone (meta device)."""
    import torch

    model = meta_model(model_dir)
    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in IGNORE
    }


def w4a16_group_size(in_features: dict[str, int], requested: int) -> int:
    """The int4 group size of w4a16 and awq: every quantized layer's in-features must be a multiple of it (one scale per
    group).

    The default tiny model has hidden size 192, so llm-compressor's preset 128 does not divide q/k/v/gate/up;
    0 (auto) picks 64 there.
    """
    sizes = sorted(set(in_features.values()))
    if requested:
        bad = {name: n for name, n in in_features.items() if n % requested}
        if bad:
            fits = [g for g in GROUP_SIZES if all(n % g == 0 for n in sizes)]
            name, n = next(iter(bad.items()))
            raise ConfigError(
                f"params.yaml: 'quantize.w4a16_group_size' is {requested}, which does not divide the in-features of "
                f"{len(bad)} layer(s) (e.g. {name}: {n}). Use one that divides {sizes}"
                + (f", e.g. {fits[0]}, or 0 to pick it automatically." if fits else ".")
            )
        return requested
    for size in GROUP_SIZES:
        if all(n % size == 0 for n in sizes):
            return size
    raise ConfigError(
        f"params.yaml: 'quantize.w4a16_group_size' is 0 (auto) but none of {list(GROUP_SIZES)} divides every quantized "
        f"layer's in-features {sizes}; set a group size that does, or drop w4a16 and awq from quantize.schemes."
    )


def awq_mappings(model_dir: Path) -> list[Any]:
    """llm-compressor's AWQ mappings for the model's architecture: which norm or linear layer each group of linear
    layers reads its input from, so that per-channel scales can move between them.

    An architecture llm-compressor has no mappings for is refused rather than given its generic Llama-style guess, and
    so is one whose module names the mappings do not find.
    """
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.modifiers.transform.awq import AWQ_DYNAMIC_MAPPING_REGISTRY, AWQ_MAPPING_REGISTRY, get_layer_mappings_from_model

    model = meta_model(model_dir)
    architecture = type(model).__name__
    if architecture not in AWQ_MAPPING_REGISTRY and architecture not in AWQ_DYNAMIC_MAPPING_REGISTRY:
        known = [a for a in AWQ_EXAMPLES if a in AWQ_MAPPING_REGISTRY]
        raise ConfigError(
            f"params.yaml: 'quantize.schemes' has awq, but llm-compressor has no AWQ mappings for {architecture} (it has "
            f"them for {len(AWQ_MAPPING_REGISTRY)} architectures, e.g. {', '.join(known)}); drop awq from quantize.schemes "
            "or quantize a model of such an architecture (the llama presets are LlamaForCausalLM)."
        )
    mappings = get_layer_mappings_from_model(model)
    unmatched = [m.smooth_layer for m in mappings if not any(True for _ in match_named_modules(model, [m.smooth_layer]))]
    if unmatched:
        raise ConfigError(
            f"params.yaml: 'quantize.schemes' has awq, but llm-compressor's AWQ mappings for {architecture} match no "
            f"module for {unmatched}; drop awq from quantize.schemes."
        )
    return mappings


def modifiers(scheme: str, cfg: QuantizeConfig, group_size: int, mappings: list[Any] | None = None) -> list[Any]:
    """The llm-compressor modifiers of one scheme (`mappings`: awq's, from `awq_mappings`).

    w8a8: SmoothQuant moves activation outliers into the weights, then GPTQ int8 weights (per channel) with int8
    activations quantized per token at run time. w4a16: GPTQ int4 weights in groups, 16-bit activations.
    awq: AWQ searches per-channel scales from the calibration activations that protect the salient input channels,
    folds them into the preceding norm or linear layer, then rounds to int4 in groups with a zero point per group
    (asymmetric, as AWQ defines it), 16-bit activations. fp8_dynamic: FP8 weights per channel and FP8 activations per
    token; no calibration data needed.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    if scheme == "w8a8":
        return [
            SmoothQuantModifier(smoothing_strength=cfg.smoothing_strength),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=IGNORE),
        ]
    if scheme == "w4a16":
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
        return [GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=IGNORE)]
    if scheme == "awq":
        if not mappings:  # AWQModifier would otherwise guess Llama-style mappings by itself
            raise ValueError("the awq scheme needs the model's mappings from awq_mappings()")
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group_size)
        return [
            AWQModifier(mappings=mappings),
            QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=IGNORE),
        ]
    if scheme == "fp8_dynamic":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE)]
    raise ConfigError(f"params.yaml: 'quantize.schemes': unknown scheme {scheme!r}; allowed: w8a8, w4a16, awq, fp8_dynamic")
