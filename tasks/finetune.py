"""finetune: instruction tuning of the pretrained model (or `model.base`), full or LoRA, loss on responses only.

Pairs come from the corpus itself (every documented function: signature + docstring -> body; split by
source file so no file is on both sides) or from `finetune.data` (JSONL). Writes
data/instructions/ (train.jsonl, eval.jsonl, quarantine.jsonl), models/finetune/ (a standalone HF
model: LoRA merged, tokenizer with the chat template) and models/adapter/ (the LoRA adapter).
Checkpoints and resume work as in pretrain.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmops.common.errors import DataError
from llmops.common.fingerprints import weights_identity
from llmops.common.io import atomic_dir, atomic_write_json, check_replaceable
from llmops.common.progress import quiet_libraries
from llmops.common.results import StageResult
from llmops.params.finetune import FinetuneConfig
from llmops.params.model import ModelConfig
from llmops.params.paths import PathsConfig
from llmops.params.train import TrainConfig
from llmops.training.instructions import TEMPLATES, build_pairs, cap_pairs, encode_pairs

# configuration and properties of the model built: MLflow params, not metrics
FINETUNE_FACTS = ("method", "trainable_parameters", "parameters", "steps", "resumed_from_step", "processes")


def base_model_dir(model: ModelConfig, paths: PathsConfig) -> str:
    if model.base:
        return model.base_at(paths.root)
    if not (paths.pretrain_model / "config.json").exists():
        raise DataError(f"{paths.pretrain_model}: no pretrained model (config.json missing); run the pretrain stage first or set model.base.")
    return str(paths.pretrain_model)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run(cfg: FinetuneConfig, train: TrainConfig, base_model: ModelConfig, paths: PathsConfig) -> StageResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from llmops.training import runtime
    from llmops.training.data import PairDataset, pair_collator

    quiet_libraries()
    for written_after_training in (paths.finetune_model, paths.adapter):
        check_replaceable(written_after_training)  # refuse a foreign folder now, not after the training it would waste
    base = base_model_dir(base_model, paths)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise DataError(f"finetune: cannot load the tokenizer of {base!r} ({exc})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.backend_tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside code is text; we add EOS ourselves
    train_pairs, eval_pairs, rejected, counts = build_pairs(cfg, train.seed, paths.dedup, paths.root)
    train_pairs, eval_pairs = cap_pairs(train_pairs, cfg.max_train_pairs), cap_pairs(eval_pairs, cfg.max_eval_pairs)
    train_examples = encode_pairs(tokenizer, train_pairs, cfg, rejected)
    eval_examples = encode_pairs(tokenizer, eval_pairs, cfg, rejected)
    tokenizer.backend_tokenizer.encode_special_tokens = False
    if not train_examples:
        raise DataError(f"finetune: no training pairs left ({len(rejected)} quarantined); see {paths.instructions}/quarantine.jsonl")
    if runtime.is_main_process():
        with atomic_dir(paths.instructions) as tmp:
            _write_jsonl(tmp / "train.jsonl", [p.to_json() for p in train_pairs])
            _write_jsonl(tmp / "eval.jsonl", [p.to_json() for p in eval_pairs])
            _write_jsonl(tmp / "quarantine.jsonl", [r.to_json() for r in rejected])

    set_seed(train.seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    except (OSError, ValueError) as exc:
        raise DataError(f"finetune: cannot load the base model {base!r} ({exc})") from None
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    world = runtime.world_size()
    steps_per_epoch = math.ceil(len(train_examples) / (cfg.batch_size * cfg.grad_accum * world))
    max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps:
        max_steps = min(max_steps, cfg.max_steps)
    optim = runtime.Optim.of(cfg, max_steps=max_steps)
    run_dir = runtime.checkpoint_dir(
        paths.checkpoints, "finetune", cfg, train, base=base, base_weights=weights_identity(base),
        pairs=[p.id for p in train_pairs[:50]] + [len(train_examples)],
    )
    train_ds = PairDataset(train_examples, seed=train.seed)
    eval_ds = PairDataset(eval_examples, seed=None) if eval_examples else None
    collator = pair_collator(tokenizer, packing=cfg.packing)

    eval_loss_before = float("nan")
    if eval_ds is not None:
        eval_loss_before = _evaluate(model, tokenizer, eval_ds, collator, train, optim, run_dir)
    trainer, fit = runtime.fit(
        train=train, optim=optim, model=model, tokenizer=tokenizer, train_dataset=train_ds, eval_dataset=eval_ds,
        collator=collator, run_dir=run_dir, stage="finetune",
    )
    tokenizer.chat_template = TEMPLATES[cfg.template]
    out, adapter_out = paths.finetune_model, paths.adapter
    # The base as params.yaml names it: recorded paths must not depend on where the checkout lives (one DVC md5).
    base_name = base_model.base or paths.relative(paths.pretrain_model)
    summary_json = {"method": cfg.method, "template": cfg.template, "base": base_name}
    if cfg.method == "lora":
        runtime.save_lora(trainer, tokenizer, out, adapter_out, summary_json, base_name)
    else:
        runtime.save_final(trainer, tokenizer, out, {"training_summary.json": summary_json})
        if runtime.is_main_process():
            with atomic_dir(adapter_out) as tmp:
                atomic_write_json(tmp / "none.json", {"note": "finetune.method=full: the whole model was trained; there is no adapter"})

    metrics = {
        "method": cfg.method,
        "pairs": {"train": len(train_examples), "eval": len(eval_examples), "quarantined": len(rejected), **counts},
        "trainable_parameters": trainable,
        "parameters": total,
        "steps": fit.steps,
        "tokens": fit.tokens,
        "train_loss": fit.train_loss,
        "eval_loss": fit.eval_loss,
        "eval_loss_before": eval_loss_before,
        "tokens_per_s": fit.tokens_per_s,
        "train_seconds": fit.train_seconds,
        "resumed_from_step": fit.resumed_from_step,
        "processes": world,
    }
    artifacts: list[Path] = []
    if runtime.is_main_process():
        curve = runtime.plot_loss_curve(fit.log_history, paths.reports / "finetune" / "loss_curve.png", f"finetune ({cfg.method})")
        before = [{"step": 0, "eval_loss": eval_loss_before}] if math.isfinite(eval_loss_before) else []
        artifacts = [curve, *runtime.write_curves(before + fit.log_history, curve.parent), paths.instructions / "quarantine.jsonl", out]
        runtime.cleanup_checkpoints(run_dir)
    summary = (
        f"finetune ({cfg.method}, {trainable / 1e6:.2f}M of {total / 1e6:.1f}M params trainable): {len(train_examples)} train / "
        f"{len(eval_examples)} eval pairs, {len(rejected)} quarantined; {fit.steps} steps, eval loss {eval_loss_before:.3f} -> "
        f"{fit.eval_loss:.3f}, {fit.tokens_per_s:,.0f} tokens/s -> {out}"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=artifacts, facts=FINETUNE_FACTS)


def _evaluate(model: Any, tokenizer: Any, eval_ds: Any, collator: Any, train: Any, optim: Any, run_dir: Path) -> float:
    """The base model's loss on the eval responses, before any fine-tuning: the number to beat."""
    from transformers import Trainer

    from llmops.training import runtime

    args = runtime.training_arguments(train, optim, run_dir / "eval-before")
    trainer = Trainer(model=model, args=args, eval_dataset=eval_ds, data_collator=collator, processing_class=tokenizer)
    runtime.quiet(trainer)
    return float(trainer.evaluate()["eval_loss"])
