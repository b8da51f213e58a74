"""pretrain: a causal LM from a transformers config (Llama-style by default, or a mixture of experts),
trained from scratch on the token shards of `tokenize` with transformers' Trainer.

Reads data/tokens/ (the train and val token shards, memory-mapped) and models/tokenizer/; writes
models/pretrain/ (HF format: config.json, model.safetensors, generation_config.json, tokenizer) and
reports/pretrain/loss_curve.png.
Resumable: checkpoints (weights, optimizer, scheduler, RNG, data position) go to
checkpoints/pretrain/<run key>/ every `train.save_every` steps; re-running after a kill continues
from the newest complete one. The run key hashes params, data and model, so a changed run never
resumes a stale checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

from llmops.common.errors import DataError
from llmops.common.fingerprints import directory_digest, file_sha256
from llmops.common.io import atomic_dir, atomic_write_json, check_replaceable
from llmops.common.results import StageResult
from llmops.params.model import ModelConfig
from llmops.params.paths import PathsConfig
from llmops.params.pretrain import PretrainConfig
from llmops.params.train import TrainConfig

# configuration and properties of the model built: MLflow params, not metrics
PRETRAIN_FACTS = ("parameters", "non_embedding_parameters", "architecture", "steps", "resumed_from_step", "processes", "flops_per_token")


def run(cfg: PretrainConfig, train: TrainConfig, model: ModelConfig, paths: PathsConfig) -> StageResult:
    out = paths.pretrain_model
    if model.base:
        # Fine-tuning starts from the given base: nothing to pretrain. The stage still leaves its output,
        # a pointer, so DVC's graph (finetune depends on pretrain) holds either way.
        with atomic_dir(out) as tmp:
            atomic_write_json(tmp / "base.json", {"base": model.base, "note": "model.base is set: pretraining skipped"})
        return StageResult(metrics={"skipped": True}, summary=f"pretrain: skipped, model.base={model.base!r} is the base model")
    return _pretrain(cfg, train, paths, out)


def _pretrain(cfg: PretrainConfig, train: TrainConfig, paths: PathsConfig, out: Path) -> StageResult:
    from transformers import AutoTokenizer, default_data_collator, set_seed

    from llmops.data.token_shards import MANIFEST, TokenShards
    from llmops.training import runtime
    from llmops.training.data import TokenBlocks, load_token_meta
    from llmops.training.model import build_config, build_model, flops_per_token, parameter_count

    check_replaceable(out)  # refuse a foreign folder now, not after the training it would waste
    tokens_dir, tokenizer_dir = paths.tokens, paths.tokenizer
    meta = load_token_meta(tokens_dir)
    if meta.get("tokenizer_sha256") != directory_digest(tokenizer_dir, algorithm="sha256"):
        raise DataError(
            f"{tokens_dir}/meta.json: its tokenizer sha256 does not match {tokenizer_dir}; the token arrays were made with "
            "another tokenizer. Re-run the tokenize stage (`dvc repro tokenize`)."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    set_seed(train.seed)
    config = build_config(cfg, vocab_size=meta["vocab_size"], eos_id=meta["eos_token_id"], pad_id=tokenizer.pad_token_id)
    lm = build_model(config)
    lm.generation_config.eos_token_id = meta["eos_token_id"]
    lm.generation_config.pad_token_id = tokenizer.pad_token_id

    # Blocks are fixed-length and never padded: stack them as they are (the Trainer's default for a
    # tokenizer, DataCollatorWithPadding, costs ~16 ms a batch and adds an all-ones attention mask).
    train_ds = TokenBlocks(TokenShards(tokens_dir, "train"), cfg.seq_len, seed=train.seed)
    eval_ds = None
    if meta["val_tokens"] >= cfg.seq_len:
        eval_ds = TokenBlocks(TokenShards(tokens_dir, "val"), cfg.seq_len, seed=None, limit_tokens=cfg.eval_tokens)
    world = runtime.world_size()
    step_tokens = cfg.batch_size * cfg.grad_accum * world * cfg.seq_len
    optim = runtime.Optim.of(cfg, max_steps=max(1, math.ceil(cfg.token_budget / step_tokens)))
    run_dir = runtime.checkpoint_dir(
        paths.checkpoints, "pretrain", cfg, train, model=config.to_dict(),
        tokens=meta["tokenizer_sha256"], token_manifest=file_sha256(tokens_dir / MANIFEST),  # it holds every shard's sha256
    )
    n_params = parameter_count(lm)
    non_embedding = parameter_count(lm, non_embedding=True)
    fpt = flops_per_token(config, non_embedding, cfg.seq_len)
    trainer, fit = runtime.fit(
        train=train, optim=optim, model=lm, tokenizer=tokenizer, train_dataset=train_ds, eval_dataset=eval_ds,
        collator=default_data_collator, run_dir=run_dir, stage="pretrain", flops_per_token=fpt,
    )
    metrics = {
        "parameters": n_params,
        "non_embedding_parameters": non_embedding,
        "architecture": config.model_type,
        "steps": fit.steps,
        "tokens": fit.tokens,
        "train_loss": fit.train_loss,
        "eval_loss": fit.eval_loss,
        "eval_perplexity": math.exp(fit.eval_loss) if math.isfinite(fit.eval_loss) and fit.eval_loss < 50 else float("inf"),
        "tokens_per_s": fit.tokens_per_s,
        "train_seconds": fit.train_seconds,
        "resumed_from_step": fit.resumed_from_step,
        "processes": world,
        "flops_per_token": fpt,
    }
    if fit.mfu is not None:
        metrics["mfu"] = fit.mfu
    summary_json = {"metrics": runtime.reproducible(metrics), "preset": cfg.preset, "run_key": run_dir.name}
    runtime.save_final(trainer, tokenizer, out, {"training_summary.json": summary_json})
    artifacts: list[Path] = []
    if runtime.is_main_process():
        curve = runtime.plot_loss_curve(fit.log_history, paths.reports / "pretrain" / "loss_curve.png", f"pretrain ({cfg.preset}, {n_params / 1e6:.1f}M params)")
        artifacts = [curve, *runtime.write_curves(fit.log_history, curve.parent), out]
        runtime.cleanup_checkpoints(run_dir)
    summary = (
        f"pretrain: {cfg.preset} ({config.model_type}, {n_params / 1e6:.1f}M params) {fit.steps} steps, {fit.tokens:,} tokens, "
        f"train loss {fit.train_loss:.3f}, eval loss {fit.eval_loss:.3f}, {fit.tokens_per_s:,.0f} tokens/s"
        + (f", resumed from step {fit.resumed_from_step}" if fit.resumed_from_step else "")
        + f" -> {out}"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=artifacts, facts=PRETRAIN_FACTS)
