"""params.yaml `align`: preference optimisation of the fine-tuned model (DPO offline, GRPO online) with TRL, and the
rule that decides whether the aligned model replaces the fine-tuned one as the candidate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmops.params.finetune import LoraConfig
from llmops.params.train import OptimSection


class AlignConfig(OptimSection):
    method: Literal["dpo", "grpo"] = "dpo"  # dpo: offline pairs; grpo: online samples scored by their doctests
    data: str = ""  # JSONL of {prompt, chosen, rejected} (dpo); "" = pairs built from the corpus by execution feedback
    tuning: Literal["lora", "full"] = "lora"  # train a LoRA adapter (merged into aligned_model) or every weight
    lora: LoraConfig = LoraConfig()
    beta: float = Field(0.1, gt=0)  # strength of the pull towards the fine-tuned (reference) model
    max_seq_len: int = Field(512, ge=16)  # prompt + response tokens; longer pairs are quarantined with the reason
    eval_fraction: float = Field(0.2, gt=0, lt=1)  # share of source files whose doctest prompts are held out
    max_prompts: int = Field(24, ge=0)  # training doctest prompts considered (by id hash; 0 = all)
    max_eval_prompts: int = Field(8, ge=0)  # held-out doctest prompts scored for both models (0 = all)
    max_examples: int = Field(3, ge=1)  # doctest examples checked per prompt (the first ones)
    samples_per_prompt: int = Field(2, ge=1)  # dpo: samples drawn to find a failing one; grpo: generations per prompt (>= 2)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)  # tokens sampled per body
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(0, ge=0)  # caps the epochs; 0 = no cap
    replace_if: Literal["pass_rate_not_lower", "pass_rate_higher", "always", "never"] = "pass_rate_not_lower"
    max_perplexity_increase: float = Field(0.05, ge=0)  # with pass_rate_*: aligned held-out perplexity <= fine-tuned's * (1 + this)
