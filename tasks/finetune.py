"""Finetune: instruction tuning of the pretrained model (or `model.base`), full or LoRA, loss on responses only.

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

from tasks.common.config import FinetuneConfig, Params
from tasks.common.errors import ConfigError, DataError
from tasks.common.io import atomic_dir, atomic_write_json
from tasks.common.result import StageResult, progress
from tasks.training.instructions import TEMPLATES, Pair, Rejected, docstring_pairs, encode_pair, in_eval_split, read_jsonl_pairs


def base_model_dir(params: Params) -> str:
    if params.model.base:
        return params.model.base
    path = Path(params.paths.pretrain_model)
    if not (path / "config.json").exists():
        raise DataError(f"{path}: no pretrained model (config.json missing); run the pretrain stage first or set model.base.")
    return str(path)


def build_pairs(params: Params, seed: int) -> tuple[list[Pair], list[Pair], list[Rejected], dict[str, int]]:
    """(train, eval, rejected, counts); train and eval never share a source file (corpus) or row."""
    cfg = params.finetune
    counts: dict[str, int] = {}
    if cfg.data:
        path = Path(cfg.data)
        if not path.is_file():
            raise ConfigError(f"params.yaml: finetune.data={cfg.data!r} is not a file (expected JSONL of prompt/response or messages)")
        pairs, rejected = read_jsonl_pairs(path)
        counts["rows"] = len(pairs) + len(rejected)
    else:
        from tasks.common.io import read_records

        table = read_records(Path(params.paths.dedup))
        pairs, rejected = [], []
        docs = list(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
        for doc_id, text in progress(docs, desc="finetune: mining docstring pairs", unit="doc"):
            pairs.extend(docstring_pairs(doc_id, text))
        counts["documents"] = len(docs)
    train = [p for p in pairs if not in_eval_split(p.source, cfg.eval_fraction, seed)]
    held = [p for p in pairs if in_eval_split(p.source, cfg.eval_fraction, seed)]
    if not held and len(train) > 1:
        held.append(train.pop())
    counts["candidates"] = len(pairs)
    return train, held, rejected, counts


def _cap(pairs: list[Pair], limit: int) -> list[Pair]:
    """A deterministic subset (by id hash), so a cap never depends on file order."""
    if not limit or len(pairs) <= limit:
        return pairs
    import hashlib

    return sorted(pairs, key=lambda p: hashlib.sha256(p.id.encode()).digest())[:limit]


def encode_all(tokenizer: Any, pairs: list[Pair], cfg: FinetuneConfig, rejected: list[Rejected]) -> list[dict[str, list[int]]]:
    out = []
    template = TEMPLATES[cfg.template]
    for pair in pairs:
        example = encode_pair(tokenizer, pair, template)
        if len(example["input_ids"]) > cfg.max_seq_len:
            rejected.append(Rejected(pair.id, f"too long: {len(example['input_ids'])} tokens > finetune.max_seq_len={cfg.max_seq_len}", pair.to_json()))
            continue
        out.append(example)
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run(params: Params) -> StageResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from tasks.training import runtime
    from tasks.training.data import PairDataset, pair_collator

    cfg, train = params.finetune, params.train
    runtime.configure_progress()
    base = base_model_dir(params)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise DataError(f"finetune: cannot load the tokenizer of {base!r} ({exc})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.backend_tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside code is text; we add EOS ourselves
    train_pairs, eval_pairs, rejected, counts = build_pairs(params, train.seed)
    train_pairs, eval_pairs = _cap(train_pairs, cfg.max_train_pairs), _cap(eval_pairs, cfg.max_eval_pairs)
    train_examples = encode_all(tokenizer, train_pairs, cfg, rejected)
    eval_examples = encode_all(tokenizer, eval_pairs, cfg, rejected)
    tokenizer.backend_tokenizer.encode_special_tokens = False
    if not train_examples:
        raise DataError(f"finetune: no training pairs left ({len(rejected)} quarantined); see {params.paths.instructions}/quarantine.jsonl")
    if runtime.is_main_process():
        with atomic_dir(Path(params.paths.instructions)) as tmp:
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
        Path(params.paths.checkpoints), "finetune", cfg, train, base=base, base_weights=_weights_digest(base),
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
    out, adapter_out = Path(params.paths.finetune_model), Path(params.paths.adapter)
    summary_json = {"method": cfg.method, "template": cfg.template, "base": base}
    if cfg.method == "lora":
        _save_lora(trainer, tokenizer, out, adapter_out, summary_json)
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
        curve = runtime.plot_loss_curve(fit.log_history, Path(params.paths.reports) / "finetune" / "loss_curve.png", f"finetune ({cfg.method})")
        artifacts = [curve, Path(params.paths.instructions) / "quarantine.jsonl", out]
        runtime.cleanup_checkpoints(run_dir)
    summary = (
        f"finetune ({cfg.method}, {trainable / 1e6:.2f}M of {total / 1e6:.1f}M params trainable): {len(train_examples)} train / "
        f"{len(eval_examples)} eval pairs, {len(rejected)} quarantined; {fit.steps} steps, eval loss {eval_loss_before:.3f} -> "
        f"{fit.eval_loss:.3f}, {fit.tokens_per_s:,.0f} tokens/s -> {out}"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=artifacts)


def _evaluate(model: Any, tokenizer: Any, eval_ds: Any, collator: Any, train: Any, optim: Any, run_dir: Path) -> float:
    """The base model's loss on the eval responses, before any fine-tuning: the number to beat."""
    from transformers import Trainer

    from tasks.training import runtime

    args = runtime.training_arguments(train, optim, run_dir / "eval-before")
    trainer = Trainer(model=model, args=args, eval_dataset=eval_ds, data_collator=collator, processing_class=tokenizer)
    runtime.quiet(trainer)
    return float(trainer.evaluate()["eval_loss"])


def _weights_digest(base: str) -> str:
    """Identity of the base weights for the checkpoint key: size and mtime of its weight files."""
    path = Path(base)
    if not path.is_dir():
        return base
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.glob("*.safetensors")))


def _save_lora(trainer: Any, tokenizer: Any, out: Path, adapter_out: Path, summary_json: dict[str, Any]) -> None:
    """The adapter as trained, and the base with the adapter merged in: a standalone model for eval and serving."""
    from tasks.training import runtime

    trainer.accelerator.wait_for_everyone()
    if not runtime.is_main_process():
        return
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_dir(adapter_out) as tmp:
        peft_model.save_pretrained(tmp)
        _sort_target_modules(tmp / "adapter_config.json")
        tokenizer.save_pretrained(tmp)
    merged = peft_model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "training_summary.json", summary_json)


def _sort_target_modules(config_file: Path) -> None:
    """peft keeps target_modules as a set and saves it in hash order, which changes with every process
    (PYTHONHASHSEED): sorted, the adapter directory of two identical runs is byte-identical."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    atomic_write_json(config_file, config)
