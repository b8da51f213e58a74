"""Causal LMs built from a transformers config (no download), their size, and the FLOPs that MFU is measured against."""

from __future__ import annotations

from typing import Any

from llmops.params.pretrain import PretrainConfig
from llmops.common.errors import ConfigError

# Dense bf16 peak of the accelerators we expect, FLOP/s; MFU is reported only where the device is known.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower and is matched first below
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
}


def build_config(cfg: PretrainConfig, vocab_size: int, eos_id: int, pad_id: int | None) -> Any:
    """A transformers config from the chosen preset: `model_type` picks the architecture, the rest are its fields."""
    from transformers import AutoConfig

    if cfg.preset not in cfg.presets:
        known = ", ".join(cfg.presets) or "none defined"
        raise ConfigError(f"params.yaml: pretrain.preset {cfg.preset!r} is not in pretrain.presets ({known})")
    fields = dict(cfg.presets[cfg.preset])
    model_type = fields.pop("model_type", "llama")
    fields.setdefault("max_position_embeddings", cfg.seq_len)
    fields["max_position_embeddings"] = max(int(fields["max_position_embeddings"]), cfg.seq_len)
    try:
        return AutoConfig.for_model(
            model_type, vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, **fields
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"params.yaml: pretrain.presets.{cfg.preset}: {exc}") from None


def build_model(config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def parameter_count(model: Any, *, non_embedding: bool = False) -> int:
    params = {id(p): p for p in model.parameters()}  # tied weights once
    total = sum(p.numel() for p in params.values())
    if non_embedding:
        total -= model.get_input_embeddings().weight.numel()
    return total


def flops_per_token(config: Any, non_embedding_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·d·T for attention (PaLM, appendix B).

    For a mixture of experts only the routed experts run, so N counts top-k of the experts.
    """
    n = float(non_embedding_params)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if experts and top_k and experts > top_k:
        inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        expert_params = 3 * config.hidden_size * inter * config.num_hidden_layers
        n -= expert_params * (experts - top_k)
    return 6.0 * n + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops() -> float | None:
    """bf16 dense peak of the current CUDA device, or None (CPU, unknown card)."""
    import torch

    if not torch.cuda.is_available():
        return None
    key = peak_flops_key(torch.cuda.get_device_name())
    return PEAK_BF16_FLOPS[key] if key else None


def peak_flops_key(device_name: str) -> str | None:
    """The PEAK_BF16_FLOPS entry for a CUDA device name: the longest key it contains ("H100 PCIe" before "H100")."""
    return next((key for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True) if key in device_name), None)
