"""What pretrain and finetune share: TrainingArguments from params, resumable checkpoints, per-step
MLflow logging (loss, lr, grad norm, tokens/s, MFU on a GPU), the final save and the loss curve."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.common import env
from llmops.common.io import atomic_dir, atomic_write_json, replace_dir
from llmops.common.fingerprints import json_key
from llmops.common.progress import quiet_libraries
from llmops.params.train import OptimSection, TrainConfig
from llmops.common.errors import ConfigError

log = logging.getLogger("llmops.train")
COMPLETE_MARKER = "llmops-complete.json"  # written after the Trainer finished a checkpoint
CHECKPOINT_PREFIX = "checkpoint-"
# How a run went, not what it trained: kept in metrics/<stage>.json and MLflow, out of the model directory,
# so two runs of the same params on the same data write byte-identical models (one DVC md5).
RUN_SPECIFIC_METRICS = frozenset({"tokens_per_s", "train_seconds", "mfu", "resumed_from_step"})


@dataclass
class Optim:
    """The optimiser keys of one stage's params section, plus the number of optimizer steps."""

    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    batch_size: int
    grad_accum: int
    max_steps: int  # > 0 always: pretrain derives it from the token budget, finetune from epochs

    @classmethod
    def of(cls, section: OptimSection, max_steps: int) -> Optim:
        """The optimiser keys of a `pretrain` or `finetune` section, with the step count the stage derived."""
        return cls(**section.model_dump(include=set(OptimSection.model_fields)), max_steps=max_steps)


@dataclass
class FitResult:
    steps: int
    train_loss: float  # mean over the last 10% of logged steps (the end of the curve, not the whole run)
    eval_loss: float
    tokens: int
    train_seconds: float
    tokens_per_s: float
    resumed_from_step: int
    log_history: list[dict[str, Any]] = field(default_factory=list)
    mfu: float | None = None


def world_size() -> int:
    return env.world_size()


def is_main_process() -> bool:
    return env.rank() == 0


def use_cuda(train: TrainConfig) -> bool:
    import torch

    if train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("params.yaml: train.device is 'cuda' but torch sees no CUDA device")
    return train.device != "cpu" and torch.cuda.is_available()


def precision_flags(train: TrainConfig) -> dict[str, bool]:
    import torch

    cuda = use_cuda(train)
    if train.precision in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"params.yaml: train.precision={train.precision} needs a GPU; use fp32 or auto on CPU")
    if train.precision == "auto":
        return {"bf16": cuda and torch.cuda.is_bf16_supported(), "fp16": False}
    return {"bf16": train.precision == "bf16", "fp16": train.precision == "fp16"}


def checkpoint_dir(root: Path, stage: str, section: Any, train: TrainConfig, **inputs: Any) -> Path:
    """checkpoints/<stage>/<run key>: the key covers the stage's params, what changes the numbers in
    `train`, the process count, and `inputs` (model config, data digests)."""
    fingerprint = {
        "stage": stage,
        stage: section.model_dump(),
        "train": train.model_dump(include={"seed", "precision", "gradient_checkpointing", "device"}),
        "world_size": world_size(),
        **inputs,
    }
    return Path(root) / stage / json_key(fingerprint)  # resumed only by a run with the same params, data, model and layout


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing; a half-written one (killed mid-save) is removed."""
    if not run_dir.is_dir():
        return None
    found = sorted(
        (p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()),
        key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
    )
    for ckpt in reversed(found):
        if (ckpt / COMPLETE_MARKER).exists():
            return ckpt
        if is_main_process():
            log.warning("removing incomplete checkpoint %s (the run was stopped while saving it)", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def training_arguments(train: TrainConfig, optim: Optim, output_dir: Path, eval_every: int = 0) -> Any:
    from transformers import TrainingArguments

    cuda = use_cuda(train)
    backend = train.ddp_backend or ("nccl" if cuda else "gloo")
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=optim.max_steps,
        per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.grad_accum,
        learning_rate=optim.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": optim.min_lr_ratio},
        warmup_steps=optim.warmup_steps,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        adam_beta2=0.95,
        train_sampling_strategy="sequential",  # the datasets hold their own seeded order (see TokenBlocks)
        logging_strategy="steps",
        logging_steps=train.log_every,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=train.save_every,
        save_total_limit=train.keep_checkpoints,
        # The held-out split every `eval_every` steps (the eval_loss curve), and always once at the end (fit).
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every or None,
        include_num_input_tokens_seen="non_padding",
        report_to="none",  # our callback logs to the stage's MLflow run (one run, no duplicate params)
        disable_tqdm=not env.progress_enabled(),
        seed=train.seed,
        data_seed=train.seed,
        use_cpu=not cuda,
        ddp_backend=backend if world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        gradient_checkpointing=train.gradient_checkpointing,
        torch_compile=train.compile,
        dataloader_num_workers=train.dataloader_workers,
        remove_unused_columns=False,
        **precision_flags(train),
    )


class TrackingCallback:
    """Per-step metrics to the stage's MLflow run, checkpoint completion markers, tokens/s and MFU.

    Built lazily as a TrainerCallback subclass so importing this module stays cheap.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _callback_class()(*args, **kwargs)


def _callback_class() -> type:
    import mlflow
    from transformers import TrainerCallback

    class _Tracking(TrainerCallback):
        def __init__(self, flops_per_token: float | None, peak: float | None) -> None:
            self.run_id = (mlflow.active_run().info.run_id if mlflow.active_run() else None) if is_main_process() else None
            self.flops_per_token = flops_per_token
            self.peak = peak
            self.last_time: float | None = None
            self.last_tokens = self.start_tokens = 0
            self.mfu_values: list[float] = []
            self.client = mlflow.MlflowClient() if self.run_id else None

        def _log(self, metrics: dict[str, float], step: int) -> None:
            if self.client is None or not metrics:
                return
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()], synchronous=False)

        def flush(self) -> None:
            """Wait for the queued metric writes (only where this process logs: the store is opened lazily)."""
            if self.client is not None:
                mlflow.flush_async_logging()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last_time = time.perf_counter()
            self.last_tokens = self.start_tokens = state.num_input_tokens_seen
            # A resumed run carries the history of the steps before the kill: replay it so this run's curve is whole.
            for entry in state.log_history:
                self._log(_step_metrics(entry), int(entry.get("step", 0)))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if state.is_world_process_zero and logs and isinstance(logs.get("eval_loss"), int | float):
                self._log({"eval_loss": float(logs["eval_loss"])}, state.global_step)  # the held-out curve
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            now = time.perf_counter()
            metrics = _step_metrics(logs)
            tokens = state.num_input_tokens_seen - self.last_tokens
            if self.last_time is not None and now > self.last_time and tokens > 0:
                tps = tokens / (now - self.last_time)
                metrics["tokens_per_s"] = tps
                logs["tokens_per_s"] = tps
                if self.flops_per_token and self.peak:
                    mfu = tps * self.flops_per_token / (self.peak * world_size())
                    metrics["mfu"] = mfu
                    logs["mfu"] = mfu
                    self.mfu_values.append(mfu)
            self.last_time, self.last_tokens = now, state.num_input_tokens_seen
            self._log(metrics, state.global_step)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
                if ckpt.is_dir():
                    (ckpt / COMPLETE_MARKER).write_text(json.dumps({"step": state.global_step, "time": time.time()}))
            self.last_time = time.perf_counter()  # saving time is not training throughput

    return _Tracking


class ConsoleCallback:
    """One progress bar with loss / lr / tokens/s as its postfix (or, with LLMOPS_PROGRESS=0, a line every ~5%),
    in place of the Trainer's dict printed on every step."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _console_class()(*args, **kwargs)


def _console_class() -> type:
    import sys

    from transformers import TrainerCallback

    class _Console(TrainerCallback):
        def __init__(self, desc: str) -> None:
            self.desc = desc
            self.bar: Any = None
            self.enabled = env.progress_enabled()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.enabled and state.is_world_process_zero:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            fields = {"loss": f"{logs['loss']:.3f}", "lr": f"{logs.get('learning_rate', 0):.2e}"}
            if "tokens_per_s" in logs:
                fields["tok/s"] = f"{logs['tokens_per_s']:,.0f}"
            if "mfu" in logs:
                fields["mfu"] = f"{logs['mfu']:.1%}"
            if self.bar is not None:
                self.bar.set_postfix(fields, refresh=False)
                return
            every = max(1, state.max_steps // 20)
            if state.global_step % every == 0 or state.global_step in (1, state.max_steps):
                text = " ".join(f"{k} {v}" for k, v in fields.items())
                print(f"{self.desc} step {state.global_step}/{state.max_steps} {text}", file=sys.stderr, flush=True)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return _Console


def _step_metrics(entry: dict[str, Any]) -> dict[str, float]:
    names = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s", "mfu": "mfu"}
    out = {}
    for key, name in names.items():
        value = entry.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
    return out


def train_resuming(trainer: Any, run_dir: Path, max_steps: int) -> tuple[Any, int, float]:
    """trainer.train() from the newest complete checkpoint in `run_dir` (from step 0 where there is none), the resume
    point logged and tagged on the stage's MLflow run; returns (the Trainer's output, the step it resumed from, seconds)."""
    resume = last_complete_checkpoint(run_dir)
    resumed_from = int(resume.name[len(CHECKPOINT_PREFIX) :]) if resume else 0
    if resume and is_main_process():
        log.warning("resuming from %s (step %d of %d)", resume, resumed_from, max_steps)
        _tag("llmops.resumed_from_step", str(resumed_from))
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return output, resumed_from, time.perf_counter() - started


def fit(
    *,
    train: TrainConfig,
    optim: Optim,
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any,
    collator: Any,
    run_dir: Path,
    stage: str,
    flops_per_token: float | None = None,
    trainer_class: Callable[..., Any] | None = None,
) -> tuple[Any, FitResult]:
    """Train with transformers' Trainer, resuming from the newest complete checkpoint in `run_dir`.

    `trainer_class` builds the trainer from the Trainer's arguments in its place (a subclass with its own loss, its
    extra arguments bound, as distill's is).
    """
    from transformers import Trainer

    from llmops.training.model import peak_flops

    run_dir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    has_eval = eval_dataset is not None and len(eval_dataset) > 0
    args = training_arguments(train, optim, run_dir, eval_every=train.eval_every if has_eval else 0)
    callback = TrackingCallback(flops_per_token, peak_flops() if use_cuda(train) else None)
    trainer = (trainer_class or Trainer)(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    quiet(trainer)
    trainer.add_callback(ConsoleCallback(f"{stage}: training"))
    output, resumed_from, seconds = train_resuming(trainer, run_dir, optim.max_steps)
    eval_loss = float("nan")
    if eval_dataset is not None and len(eval_dataset):
        eval_loss = float(trainer.evaluate(eval_dataset)["eval_loss"])  # also the last point of the eval_loss curve
    callback.flush()
    history = [dict(e) for e in trainer.state.log_history]
    losses = [e["loss"] for e in history if "loss" in e]
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float(output.training_loss)]
    session_tokens = trainer.state.num_input_tokens_seen - callback.start_tokens
    result = FitResult(
        steps=trainer.state.global_step,
        train_loss=float(sum(tail) / len(tail)),
        eval_loss=eval_loss,
        tokens=int(trainer.state.num_input_tokens_seen),
        train_seconds=seconds,
        tokens_per_s=session_tokens / seconds if seconds > 0 else 0.0,
        resumed_from_step=resumed_from,
        log_history=history,
        mfu=(sum(callback.mfu_values) / len(callback.mfu_values)) if callback.mfu_values else None,
    )
    return trainer, result


def quiet(trainer: Any) -> None:
    """Drop the Trainer's own console callbacks (a dict per step); ConsoleCallback reports instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _tag(key: str, value: str) -> None:
    import mlflow

    if mlflow.active_run():
        mlflow.set_tag(key, value)


def write_curves(history: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per-step values as TSV for `dvc plots`: train_curve.tsv (step, loss, lr, grad_norm) and eval_curve.tsv
    (step, eval_loss: every train.eval_every steps and at the end)."""
    from llmops.common.io import atomic_write_bytes

    def fmt(value: Any) -> str:
        return "" if value is None else f"{float(value):.6g}"

    train = [(e["step"], e["loss"], e.get("learning_rate"), e.get("grad_norm")) for e in history if "loss" in e]
    evals = sorted({e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}.items())
    files = {
        "train_curve.tsv": "step\tloss\tlr\tgrad_norm\n" + "".join(f"{s}\t{fmt(l)}\t{fmt(lr)}\t{fmt(g)}\n" for s, l, lr, g in train),
        "eval_curve.tsv": "step\teval_loss\n" + "".join(f"{s}\t{fmt(l)}\n" for s, l in evals),
    }
    out = []
    for name, text in files.items():
        atomic_write_bytes(out_dir / name, text.encode())
        out.append(out_dir / name)
    return out


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in history if "loss" in e]
    losses = [e["loss"] for e in history if "loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, label="train loss")
    evals = sorted({e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}.items())
    if evals:
        ax.plot(*zip(*evals, strict=True), color="tab:red", marker="o", label="eval loss", zorder=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def cleanup_checkpoints(run_dir: Path) -> None:
    """A finished stage's output is the model; its resumable state is no longer needed."""
    if is_main_process():
        shutil.rmtree(run_dir, ignore_errors=True)


def reproducible(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` without the entries that differ between identical runs (timings, where a resumed run started)."""
    return {k: v for k, v in metrics.items() if k not in RUN_SPECIFIC_METRICS}


def save_final(trainer: Any, tokenizer: Any, out: Path, extra_json: dict[str, Any] | None = None) -> None:
    """Write the trained model + tokenizer in HF format (safetensors) to `out` in one rename.

    Every process calls this (FSDP and ZeRO-3 gather weights collectively); process 0 writes.
    """

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-final"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if not is_main_process():
        return
    tokenizer.save_pretrained(tmp)
    # The pickled TrainingArguments hold console settings (disable_tqdm), so the same training under another
    # console would change the directory's md5; a model directory also carries no pickles (serve refuses them).
    # The run is described by training_summary.json, params.yaml and the stage's MLflow run.
    (tmp / "training_args.bin").unlink(missing_ok=True)
    for name, obj in (extra_json or {}).items():
        atomic_write_json(tmp / name, obj)
    replace_dir(tmp, out)


def save_lora(trainer: Any, tokenizer: Any, out: Path, adapter_out: Path, summary_json: dict[str, Any], base_name: str) -> None:
    """The adapter as trained (its base recorded as `base_name`), and the base with the adapter merged in: a standalone
    model for eval and serving."""
    trainer.accelerator.wait_for_everyone()
    if not is_main_process():
        return
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    # Recorded as params.yaml names it, not as the absolute path it was loaded from (adapter config and model card).
    for adapter_config in peft_model.peft_config.values():
        adapter_config.base_model_name_or_path = base_name
    base = peft_model.get_base_model()
    base.config.name_or_path = base.name_or_path = base_name
    with atomic_dir(adapter_out) as tmp:
        peft_model.save_pretrained(tmp)
        sort_target_modules(tmp / "adapter_config.json")
        tokenizer.save_pretrained(tmp)
    merged = peft_model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "training_summary.json", summary_json)


def sort_target_modules(config_file: Path) -> None:
    """peft keeps target_modules as a set and saves it in hash order, which changes with every process
    (PYTHONHASHSEED): sorted, the adapter directory of two identical runs is byte-identical."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    atomic_write_json(config_file, config)
