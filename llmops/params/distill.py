"""params.yaml `distill`: the student (the teacher's architecture with fewer layers), its initialisation, the
distillation loss, its optimiser, and how student and teacher are compared (quality, size, speed, speculative decoding)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmops.params.train import OptimSection


class DistillConfig(OptimSection):
    num_layers: int = Field(2, ge=1)  # student depth; every other config field is the teacher's (same tokenizer and width)
    init: Literal["drop_layers", "random"] = "drop_layers"  # drop_layers: keep every k-th teacher layer (k = teacher / student layers)
    temperature: float = Field(2.0, gt=0)  # softens both distributions; the KL term is scaled by temperature**2
    ce_weight: float = Field(0.0, ge=0, le=1)  # loss = (1 - ce_weight) * T^2 * KL(teacher || student) + ce_weight * CE(labels)
    packing: bool = True  # pairs share a row (position ids restart per pair), as in finetune
    max_seq_len: int = Field(512, ge=16)  # longer pairs are left out (finetune quarantined them already)
    max_train_pairs: int = Field(0, ge=0)  # of finetune's train split (data/instructions/train.jsonl); 0 = all
    max_eval_pairs: int = Field(50, ge=1)  # of finetune's eval split: the held-out KL to the teacher, before and after
    max_steps: int = Field(30, ge=1)  # optimizer steps (a CPU-sized default)
    humaneval_problems: int = Field(5, ge=0, le=164)  # HumanEval problems scored for student and teacher (evaluate's settings); 0 = skip
    speed_new_tokens: int = Field(32, ge=1)  # tokens/s of greedy generation on CPU: new tokens per timed run (EOS ignored)
    speed_repeats: int = Field(3, ge=1)  # timed runs per model after a warm-up; the median is reported
    speculative_prompts: int = Field(4, ge=0, le=164)  # HumanEval prompts for the acceptance rate and speed-up of the student as draft; 0 = skip
    speculative_new_tokens: int = Field(48, ge=1)  # greedy tokens per prompt in that measurement
    num_speculative_tokens: int = Field(4, ge=1)  # draft tokens proposed per round in that measurement
    register_student: bool = True  # register the student as its own model (needs the stage's MLflow run)
    model_name: str = Field("", pattern=r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)?$")  # "" = <register.model_name>-draft
