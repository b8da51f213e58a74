"""What the align stage runs with TRL: its trainer configs from params (the Trainer knobs of runtime.training_arguments),
DPO pairs by execution feedback and the GRPO reward (doctests scored by llmops.evaluation.doctests), per-step MLflow
logging of TRL's preference metrics, resume, the merged save, and the rule that picks the candidate model (fine-tuned or aligned) that
metrics/align.json records (llmops.training.candidate reads it back)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.common.io import atomic_dir, atomic_write_json
from llmops.evaluation.doctests import score_bodies
from llmops.params.evaluate import EvaluateConfig
from llmops.params.finetune import LoraConfig
from llmops.params.train import TrainConfig
from llmops.training import runtime
from llmops.training.preferences import DoctestPrompt, PreferencePair

# TRL's per-step logs that go to MLflow beside loss / lr / grad_norm: DPO's implicit rewards and log-probs, GRPO's reward.
PREFERENCE_LOG_KEYS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
    "reward", "reward_std", "kl", "entropy", "completions/mean_length",
)  # fmt: skip


def trl_config(config_class: type, train: TrainConfig, optim: runtime.Optim, run_dir: Path, **trl_fields: Any) -> Any:
    """A TRL config (DPOConfig, GRPOConfig: TrainingArguments subclasses) with every TrainingArguments field as
    runtime.training_arguments sets it for finetune (CPU / precision from `train`, no bf16 on CPU, no gradient
    checkpointing unless asked), plus the trainer's own fields."""
    from transformers import TrainingArguments

    base = runtime.training_arguments(train, optim, run_dir)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    return config_class(**fields, **trl_fields)


def peft_config(tuning: str, lora: LoraConfig) -> Any:
    """finetune's LoRA settings as a peft config (None for full tuning)."""
    if tuning != "lora":
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, task_type="CAUSAL_LM")


def execution_pairs(
    prompts: list[DoctestPrompt], samples: list[list[str]], evaluate: EvaluateConfig, *, isolated: bool, counts: Counter[str]
) -> list[PreferencePair]:
    """DPO pairs by execution feedback: chosen is the prompt's reference body (the caller kept only prompts whose
    reference passes its doctests), rejected the first of its `samples` that fails them in the sandbox. A prompt
    whose samples all pass gives no pair (counted as no_failing_sample)."""
    flat = [(prompt, body) for prompt, bodies in zip(prompts, samples, strict=True) for body in bodies]
    passed = iter(score_bodies([p for p, _ in flat], [b for _, b in flat], evaluate, isolated=isolated, per_example=False))
    pairs = []
    for prompt, bodies in zip(prompts, samples, strict=True):
        failing = [body for body in bodies if not next(passed)]
        if not failing:
            counts["no_failing_sample"] += 1
            continue
        pairs.append(PreferencePair(prompt.id, prompt.prompt, prompt.reference, failing[0], chosen_score=1.0, rejected_score=0.0))
    return pairs


def doctest_reward(by_id: dict[str, DoctestPrompt], evaluate: EvaluateConfig, *, isolated: bool) -> Callable[..., list[float]]:
    """GRPO's verifiable reward: the share of the prompt's doctest examples that the sampled body (cut at the first
    stop sequence, as evaluate cuts bodies) passes, run in the sandbox. The dataset's `doctest_id` column names the
    prompt."""
    from llmops.evaluation.scoring import truncate_at_stop

    def doctest_pass_share(prompts: list[str], completions: list[str], doctest_id: list[str], **_: Any) -> list[float]:
        bodies = [truncate_at_stop(c) for c in completions]
        return score_bodies([by_id[i] for i in doctest_id], bodies, evaluate, isolated=isolated, per_example=True)

    return doctest_pass_share  # TRL logs rewards/<function name>/mean


class PreferenceLogCallback:
    """TRL's preference metrics (PREFERENCE_LOG_KEYS) per logged step to the stage's MLflow run; built lazily as a
    TrainerCallback subclass so importing this module stays cheap."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _preference_log_class()(*args, **kwargs)


def _preference_log_class() -> type:
    import mlflow
    from transformers import TrainerCallback

    class _PreferenceLog(TrainerCallback):
        def __init__(self) -> None:
            run = mlflow.active_run() if runtime.is_main_process() else None
            self.run_id = run.info.run_id if run else None
            self.client = mlflow.MlflowClient() if self.run_id else None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if self.client is None or not logs or not state.is_world_process_zero:
                return
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [
                Metric(key, float(value), now, state.global_step)
                for key, value in logs.items()
                if (key in PREFERENCE_LOG_KEYS or key.startswith("rewards/doctest")) and isinstance(value, int | float) and math.isfinite(value)
            ]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics, synchronous=False)

    return _PreferenceLog


def fit(trainer: Any, run_dir: Path, max_steps: int) -> dict[str, Any]:
    """Train, resuming from the newest complete checkpoint in `run_dir` (runtime.train_resuming, as pretrain and
    finetune do); returns steps, seconds, where it resumed from and the per-step log history."""
    _, resumed_from, seconds = runtime.train_resuming(trainer, run_dir, max_steps)
    return {
        "steps": trainer.state.global_step, "train_seconds": seconds, "resumed_from_step": resumed_from,
        "log_history": [dict(entry) for entry in trainer.state.log_history],
    }


def attach_callbacks(trainer: Any, desc: str) -> None:
    """finetune's console progress and MLflow logging (loss, lr, grad norm, checkpoint completion markers), plus TRL's
    preference metrics."""
    runtime.quiet(trainer)
    trainer.add_callback(runtime.TrackingCallback(None, None))
    trainer.add_callback(PreferenceLogCallback())
    trainer.add_callback(runtime.ConsoleCallback(desc))


def save_aligned(trainer: Any, tokenizer: Any, out: Path, summary: dict[str, Any]) -> None:
    """The trained policy as a standalone HF model in `out` (a LoRA adapter merged into its base), with the tokenizer
    (and its chat template) and training_summary.json, in one rename."""
    from peft import PeftModel

    trainer.accelerator.wait_for_everyone()
    if not runtime.is_main_process():
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "training_summary.json", summary)


def trl_curves(history: list[dict[str, Any]]) -> str:
    """TRL's per-step preference metrics as TSV (step + the PREFERENCE_LOG_KEYS that were logged), for `dvc plots`."""
    keys = [k for k in PREFERENCE_LOG_KEYS if any(k in entry for entry in history)]
    rows = [entry for entry in history if "loss" in entry]
    lines = ["\t".join(["step", "loss", *keys])]
    for entry in rows:
        values = [entry.get("step"), entry.get("loss"), *(entry.get(k) for k in keys)]
        lines.append("\t".join("" if v is None else f"{float(v):.6g}" for v in values))
    return "\n".join(lines) + "\n"


def last_logged(history: list[dict[str, Any]], key: str) -> float | None:
    """The mean of `key` over the last 10% of the steps that logged it (the end of the curve), or None."""
    values = [float(e[key]) for e in history if isinstance(e.get(key), int | float)]
    if not values:
        return None
    tail = values[-max(1, len(values) // 10) :]
    return sum(tail) / len(tail)


def first_logged(history: list[dict[str, Any]], key: str) -> float | None:
    values = [float(e[key]) for e in history if isinstance(e.get(key), int | float)]
    return values[0] if values else None


def choose_candidate(rule: str, finetuned: dict[str, Any], aligned: dict[str, Any], max_perplexity_increase: float) -> tuple[str, str]:
    """('aligned' | 'finetuned', why) under align.replace_if, from each model's held-out doctest pass rate
    (`doctest_pass_rate`) and held-out perplexity."""
    if rule == "always":
        return "aligned", "align.replace_if=always"
    if rule == "never":
        return "finetuned", "align.replace_if=never"
    ceiling = finetuned["perplexity"] * (1 + max_perplexity_increase)
    if not aligned["perplexity"] <= ceiling:
        return "finetuned", (
            f"aligned perplexity {aligned['perplexity']:.2f} > fine-tuned {finetuned['perplexity']:.2f} x (1 + "
            f"align.max_perplexity_increase={max_perplexity_increase})"
        )
    ours, theirs = aligned["doctest_pass_rate"], finetuned["doctest_pass_rate"]
    if ours is None or theirs is None:
        return "finetuned", f"no held-out doctest prompt in the corpus: align.replace_if={rule} cannot be checked"
    better = ours > theirs if rule == "pass_rate_higher" else ours >= theirs
    relation = ">" if rule == "pass_rate_higher" else ">="
    verdict = "holds" if better else "fails"
    return ("aligned" if better else "finetuned"), (
        f"held-out doctest pass rate aligned {ours:.3f} {relation} fine-tuned {theirs:.3f} {verdict} (align.replace_if={rule}); "
        f"perplexity {aligned['perplexity']:.2f} within {max_perplexity_increase:.0%} of {finetuned['perplexity']:.2f}"
    )
