"""params.yaml `train` (how pretrain and finetune run: launcher, precision, checkpoints) and the optimiser knobs that
the `pretrain` and `finetune` sections share."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmops.params.base import Section


class TrainConfig(Section):
    launcher: Literal["none", "torchrun", "accelerate"] = "none"
    nproc_per_node: int = Field(1, ge=1)  # processes per node under torchrun / accelerate
    nnodes: int = Field(1, ge=1)
    accelerate_config: str = "infra/accelerate/ddp.yaml"  # used when launcher = accelerate, relative to the repository root
    ddp_backend: Literal["", "gloo", "nccl"] = ""  # "" = nccl on GPU, gloo on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on a GPU that has it, else fp32
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    seed: int = 0
    log_every: int = Field(1, ge=1)  # optimizer steps between MLflow metric points
    eval_every: int = Field(0, ge=0)  # optimizer steps between held-out evaluations (the eval_loss curve); 0 = at the end only
    save_every: int = Field(50, ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = Field(2, ge=1)
    dataloader_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class OptimSection(Section):
    """The optimiser keys of `pretrain` and `finetune` (the same YAML keys in both; each section sets its own defaults)."""

    batch_size: int = Field(8, ge=1)  # per process per micro-batch
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio after warmup
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
