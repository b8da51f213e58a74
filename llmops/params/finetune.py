"""params.yaml `finetune`: instruction pairs, LoRA or full fine-tuning, and its optimiser."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmops.params.base import Section
from llmops.params.train import OptimSection


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"  # peft's name for every linear layer but the output head


class FinetuneConfig(OptimSection):
    data: str = ""  # JSONL of {prompt, response} or {messages: [...]}; "" = docstring -> body pairs from the corpus
    method: Literal["lora", "full"] = "lora"
    template: Literal["code", "chat"] = "code"  # code: prompt and response concatenated, as HumanEval prompts
    max_seq_len: int = Field(512, ge=16)  # longer pairs are quarantined with the reason
    packing: bool = True  # padding-free packing (position ids restart per pair); false = pad each batch
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # share of source files (corpus pairs) or rows held out
    max_train_pairs: int = Field(0, ge=0)  # 0 = all
    max_eval_pairs: int = Field(100, ge=0)  # 0 = all
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(0, ge=0)  # caps the epochs; 0 = no cap
    lora: LoraConfig = LoraConfig()
