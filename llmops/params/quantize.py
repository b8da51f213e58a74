"""params.yaml `quantize`: llm-compressor schemes and how their variants are measured."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmops.params.base import Section

QuantizeScheme = Literal["w8a8", "w4a16", "fp8_dynamic", "awq"]


class QuantizeConfig(Section):
    """llm-compressor schemes applied to the fine-tuned model, and how their quality, size, memory and speed are measured."""

    schemes: list[QuantizeScheme] = Field(default_factory=lambda: ["w8a8", "w4a16", "fp8_dynamic"])  # fp8_dynamic: GPU only
    calibration_samples: int = Field(64, ge=1)  # blocks of the train split fed to SmoothQuant / GPTQ / AWQ
    calibration_seq_len: int = Field(256, ge=8)  # tokens per calibration block
    calibration_batch_size: int = Field(16, ge=1)  # blocks per calibration forward pass (AWQ's scale search replays every batch at each grid point)
    seed: int = 0  # which train blocks are drawn
    smoothing_strength: float = Field(0.8, gt=0, lt=1)  # SmoothQuant alpha (W8A8): activation outliers moved into weights
    w4a16_group_size: int = Field(0, ge=0)  # int4 weights per scale (w4a16 and awq); 0 = the largest of 128/64/32 (vLLM's int4 kernels) dividing every layer's in-features
    max_perplexity_increase: float = Field(0.10, ge=0)  # relative held-out perplexity increase a variant may show (0.10 = 10%)
    humaneval: bool = True  # also score HumanEval pass@1 of every variant (evaluate.max_problems problems)
    latency_prompt_tokens: int = Field(32, ge=1)  # CPU generation latency: prompt length (from the held-out split)
    latency_new_tokens: int = Field(32, ge=1)  # tokens generated per timed run (EOS ignored, so every run is equal)
    latency_repeats: int = Field(5, ge=1)  # timed runs per model (median reported), after one warm-up

    @model_validator(mode="after")
    def _distinct(self) -> QuantizeConfig:
        if len(set(self.schemes)) != len(self.schemes):
            raise ValueError(f"schemes must not repeat (got {self.schemes})")
        return self
