"""params.yaml `pretrain`: the model preset, the token budget and the optimiser of pretraining from scratch."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from llmops.params.train import OptimSection


class PretrainConfig(OptimSection):
    preset: str = "tiny"  # a key of `presets`
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name -> transformers config fields (+ model_type)
    seq_len: int = Field(256, ge=8)
    token_budget: int = Field(400_000, ge=1)  # training tokens; steps = budget / (batch * accum * processes * seq_len)
    batch_size: int = Field(16, ge=1)  # per process
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    eval_tokens: int = Field(50_000, ge=0)  # held-out tokens scored at the end (0 = the whole val split)

    @model_validator(mode="after")
    def _preset_exists(self) -> PretrainConfig:
        if self.presets and self.preset not in self.presets:
            raise ValueError(f"preset {self.preset!r} is not one of the presets: {', '.join(self.presets)}")
        return self
