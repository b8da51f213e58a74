"""Knowledge distillation into a shallower student: its config and initialisation (random, or every k-th teacher layer,
the pruning-then-distillation recipe), the loss (forward KL to the teacher's temperature-softened token distributions,
optionally mixed with cross-entropy on the labels), a Trainer that trains on it, and the held-out KL that measures it.

Why a `Trainer.compute_loss` subclass and not TRL's GKDTrainer / DistillationTrainer: TRL's trainers tokenize and
collate their own prompt/completion datasets (padded batches: no padding-free packing, and they forward no position
ids, so packed pairs would attend across each other), GKD scores at temperature 1 whatever its `temperature` (that
one is for sampling), and neither mixes in the cross-entropy term. Measured with `benchmarks/bench_distill.py
--project DIR --steps 10` (the default tiny preset teacher, 4 -> 2 layers, batch 8, the same 75 pairs, student
initialisation and optimiser; 2 CPU threads on a 2-core machine shared with other jobs, load average ~10): the subclass
took 9.4 s/step and reached a held-out KL of 0.0015 nats/token, GKDTrainer (lmbda=0, beta=0) 14.9 s/step and 0.0016:
packing saves the padding GKD computes on, for the same objective.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path
from typing import Any

from llmops.common.errors import ConfigError, DataError

LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")  # decoder blocks in a transformers state dict (llama, mistral, mixtral, qwen...)


def kept_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layers a `drop_layers` student keeps: every k-th from the first, k = teacher / student layers."""
    if not 1 <= student_layers < teacher_layers:
        raise ConfigError(
            f"params.yaml: distill.num_layers={student_layers} must be at least 1 and fewer than the teacher's {teacher_layers} layers"
        )
    step = teacher_layers / student_layers
    return [math.floor(i * step) for i in range(student_layers)]


def student_config(teacher_config: Any, num_layers: int) -> Any:
    """The teacher's config with `num_layers` decoder layers (per-layer lists such as layer_types cut to match)."""
    keep = kept_layers(teacher_config.num_hidden_layers, num_layers)
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = num_layers
    for name, value in vars(teacher_config).items():
        if isinstance(value, list) and len(value) == teacher_config.num_hidden_layers and name.startswith("layer"):
            setattr(config, name, [value[i] for i in keep])
    return config


def init_student(teacher: Any, num_layers: int, init: str) -> Any:
    """A student of `num_layers` layers: random weights, or (`drop_layers`) the teacher's embeddings, norm, head and
    every k-th decoder layer copied in."""
    from transformers import AutoModelForCausalLM

    config = student_config(teacher.config, num_layers)
    student = AutoModelForCausalLM.from_config(config)
    if init == "random":
        return student
    keep = kept_layers(teacher.config.num_hidden_layers, num_layers)
    source = teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        match = LAYER_KEY.search(key)
        teacher_key = key if match is None else f"{key[: match.start()]}.layers.{keep[int(match.group(1))]}.{key[match.end() :]}"
        mapped[key] = source[teacher_key]
    student.load_state_dict(mapped, strict=True)
    return student


def distillation_loss(student_logits: Any, teacher_logits: Any, labels: Any, temperature: float, ce_weight: float) -> tuple[Any, Any, Any]:
    """(loss, kl, ce) over the positions that predict a label (labels != -100, shifted as in causal LM training).

    kl is KL(teacher || student) of the temperature-softened distributions, nats per token; the loss scales it by
    temperature**2 (so its gradient does not shrink as the temperature grows, Hinton et al. 2015) and mixes in the
    cross-entropy on the labels with weight `ce_weight`.
    """
    import torch.nn.functional as F

    from llmops.training.data import IGNORE_INDEX

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if not bool(mask.any()):
        zero = student_logits.sum() * 0.0
        return zero, zero.detach(), zero.detach()
    student = student_logits[:, :-1][mask].float()
    teacher = teacher_logits[:, :-1][mask].float()
    student_logp = F.log_softmax(student / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(student_logp, teacher_logp, reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student, targets[mask])
    loss = (1.0 - ce_weight) * temperature**2 * kl + ce_weight * ce
    return loss, kl.detach(), ce.detach()


def _trainer_class() -> type:
    import torch
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """A Trainer whose loss is distillation_loss against a frozen teacher run on the same (packed) batch."""

        def __init__(self, *args: Any, teacher: Any, temperature: float, ce_weight: float, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval()
            self.teacher.requires_grad_(False)
            self.temperature, self.ce_weight = temperature, ce_weight
            self.model_accepts_loss_kwargs = False  # the loss is a per-micro-batch mean, not a token sum
            self.kd_log: dict[str, list[float]] = {"kl": [], "ce": []}

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
            labels = inputs["labels"]
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            outputs = model(**model_inputs)
            with torch.no_grad():
                teacher_logits = self.teacher(**model_inputs).logits
            loss, kl, ce = distillation_loss(outputs.logits, teacher_logits, labels, self.temperature, self.ce_weight)
            if model.training:
                self.kd_log["kl"].append(float(kl))
                self.kd_log["ce"].append(float(ce))
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            """Adds the KL and CE terms, averaged since the last log, to the training loss the Trainer logs, and to the
            stage's MLflow run as the curves kd_kl and kd_ce (the loss itself is runtime.TrackingCallback's `loss`)."""
            import mlflow

            if "loss" in logs and self.kd_log["kl"]:
                terms = {f"kd_{name}": sum(values) / len(values) for name, values in self.kd_log.items()}
                for values in self.kd_log.values():
                    values.clear()
                logs.update(terms)
                if mlflow.active_run() is not None and self.is_world_process_zero():
                    mlflow.log_metrics(terms, step=self.state.global_step)
            super().log(logs, *args, **kwargs)

    return DistillTrainer


def fit(*, train: Any, optim: Any, student: Any, teacher: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
        collator: Any, run_dir: Path, temperature: float, ce_weight: float) -> tuple[Any, Any]:
    """runtime.fit (resume from the newest complete checkpoint, MLflow per-step metrics, progress) with the distillation
    Trainer; returns (trainer, runtime.FitResult)."""
    from llmops.training import runtime

    trainer_class = functools.partial(_trainer_class(), teacher=teacher, temperature=temperature, ce_weight=ce_weight)
    return runtime.fit(
        train=train, optim=optim, model=student, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset,
        collator=collator, run_dir=run_dir, stage="distill", trainer_class=trainer_class,
    )


def held_out_kl(student: Any, teacher: Any, examples: list[dict[str, list[int]]], *, batch_size: int = 8) -> float:
    """Mean KL(teacher || student) at temperature 1, nats per response token, over tokenized pairs (one row each)."""
    import torch

    from llmops.training.data import IGNORE_INDEX

    if not examples:
        raise DataError("distill: no held-out pairs to measure the KL to the teacher on")
    student.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in batch])
            mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch])
            labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in batch])
            device = next(student.parameters()).device
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            student_logits = student(input_ids=ids, attention_mask=mask).logits
            teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            _, kl, _ = distillation_loss(student_logits, teacher_logits, labels, 1.0, 0.0)
            total += float(kl) * n
            tokens += n
    return total / max(tokens, 1)
