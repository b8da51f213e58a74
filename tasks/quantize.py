"""Quantize: llm-compressor schemes (W8A8 SmoothQuant+GPTQ, W4A16 GPTQ, FP8 dynamic on a GPU) applied to the fine-tuned
model with calibration blocks from the train split; each variant scored with evaluate's code against the unquantized
model in the same run.

Reads models/finetune/ and data/tokens/; writes models/quantized/<scheme>/ (compressed-tensors HF directories, the
format vLLM loads), reports/quantize/table.md (+ llm-compressor's log), an MLflow table, and returns the metrics that
`run_stage` writes to metrics/quantize.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tasks.common.config import Params, QuantizeConfig
from tasks.common.errors import DataError
from tasks.common.io import atomic_dir
from tasks.common.result import StageResult
from tasks.quantization import measure, recipes
from tasks.quantization.console import quiet_compressor

log = logging.getLogger("llmops.quantize")
BASELINE = "unquantized"
TABLE_FILE = "table.md"
MLFLOW_TABLE = "quantize_table.json"
COMPRESSOR_LOG = "llmcompressor.log"


def calibration_dataset(tokens: Path, cfg: QuantizeConfig) -> Any:
    """`calibration_samples` blocks of `calibration_seq_len` tokens drawn (seeded) from the train split, as the
    pre-tokenized `datasets.Dataset` llm-compressor's oneshot takes."""
    from datasets import Dataset

    from tasks.training.data import TokenBlocks, load_token_meta

    meta = load_token_meta(tokens)
    if meta["train_tokens"] < cfg.calibration_seq_len:
        raise DataError(
            f"{tokens / 'train.bin'}: {meta['train_tokens']} tokens is less than one calibration block of "
            f"quantize.calibration_seq_len={cfg.calibration_seq_len}; lower it or add data."
        )
    blocks = TokenBlocks(tokens / "train.bin", meta["dtype"], cfg.calibration_seq_len, seed=cfg.seed)
    count = min(cfg.calibration_samples, len(blocks))
    if count < cfg.calibration_samples:
        log.warning("quantize: the train split holds %d blocks of %d tokens; calibrating on those, not the %d asked for",
                    count, cfg.calibration_seq_len, cfg.calibration_samples)
    ids = [blocks[i]["input_ids"].tolist() for i in range(count)]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def latency_prompt(tokens: Path, cfg: QuantizeConfig) -> list[int]:
    """The fixed prompt every model is timed on: the first tokens of the held-out split."""
    import numpy as np

    from tasks.training.data import load_token_meta

    meta = load_token_meta(tokens)
    return np.memmap(tokens / "val.bin", dtype=np.dtype(meta["dtype"]), mode="r")[: cfg.latency_prompt_tokens].tolist()


def quantize(model_dir: Path, modifiers: list[Any], calibration: Any, cfg: QuantizeConfig, dest: Path) -> float:
    """One oneshot run on a fresh copy of the model, saved compressed with its tokenizer; returns seconds taken."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    oneshot(
        model=model, processor=tokenizer, recipe=modifiers, dataset=calibration, num_calibration_samples=len(calibration),
        max_seq_length=cfg.calibration_seq_len, shuffle_calibration_samples=False,
    )
    model.save_pretrained(str(dest), save_compressed=True)
    tokenizer.save_pretrained(str(dest))
    return time.perf_counter() - started


def score(name: str, model_dir: Path, params: Params, prompt: list[int]) -> dict[str, Any]:
    """Evaluate's held-out perplexity and HumanEval pass@1, then the footprint measured in a fresh process."""
    from tasks.evaluate import held_out_perplexity, humaneval
    from tasks.evaluation.generation import load_model

    cfg = params.quantize
    row: dict[str, Any] = {"scheme": name}
    ppl = held_out_perplexity(model_dir, params, f"quantize: perplexity ({name})")
    row.update(perplexity=ppl["perplexity"], loss=ppl["loss"])
    if cfg.humaneval and params.evaluate.max_problems:
        model, tokenizer = load_model(model_dir)
        he, _ = humaneval(model, tokenizer, params.evaluate)
        row["pass_at_1"] = he["pass_at_1"]
        del model  # not resident while the footprint child runs
    footprint = measure.measure_in_child(model_dir, prompt, cfg.latency_new_tokens, cfg.latency_repeats)
    row.update(size_mb=measure.disk_mb(model_dir), load_mb=footprint.load_mb, peak_rss_mb=footprint.peak_rss_mb,
               weights_mb=footprint.weights_mb, ms_per_token=footprint.ms_per_token, threads=footprint.threads)
    return row


def compare(row: dict[str, Any], base: dict[str, Any], cfg: QuantizeConfig) -> dict[str, Any]:
    """A variant's row with its deltas and ratios against the unquantized row (ratios > 1 are gains)."""
    increase = row["perplexity"] / base["perplexity"] - 1
    out = {
        **row,
        "perplexity_increase": increase,
        "within_tolerance": increase <= cfg.max_perplexity_increase,
        "size_ratio": base["size_mb"] / row["size_mb"],
        "memory_ratio": base["load_mb"] / row["load_mb"] if row["load_mb"] > 0 else None,  # growth can read 0 on a tiny model
        "speedup": base["ms_per_token"] / row["ms_per_token"],
    }
    if "pass_at_1" in row:
        out["pass_at_1_delta"] = row["pass_at_1"] - base["pass_at_1"]
    return out


def markdown_table(rows: list[dict[str, Any]], notes: list[str]) -> str:
    def num(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    lines = [
        "| scheme | perplexity | Δ perplexity | pass@1 | Δ pass@1 | size MB | smaller | load MB | less memory | ms/token | speed-up | within tolerance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        variant = row["scheme"] != BASELINE
        lines.append(" | ".join([
            f"| {row['scheme']}", num(row, "perplexity", ".3f"),
            f"{row['perplexity_increase']:+.2%}" if variant else "-", num(row, "pass_at_1", ".3f"),
            num(row, "pass_at_1_delta", "+.3f") if variant else "-", num(row, "size_mb", ".2f"),
            f"{row['size_ratio']:.2f}x" if variant else "-", num(row, "load_mb", ".1f"),
            f"{num(row, 'memory_ratio', '.2f')}x" if variant else "-", num(row, "ms_per_token", ".2f"),
            f"{row['speedup']:.2f}x" if variant else "-", ("yes" if row["within_tolerance"] else "NO") if variant else "-",
        ]) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def run(params: Params) -> StageResult:
    from tasks.common import tracking
    from tasks.training import runtime

    cfg = params.quantize
    runtime.configure_progress()
    model_dir, tokens = Path(params.paths.finetune_model), Path(params.paths.tokens)
    if not (model_dir / "config.json").exists():
        raise DataError(f"{model_dir}: no fine-tuned model (config.json missing); run the finetune stage first.")
    skipped = {s: reason for s in cfg.schemes if (reason := recipes.unavailable(s))}
    for scheme, reason in skipped.items():
        log.warning("quantize: skipping %s: %s", scheme, reason)
    schemes = [s for s in cfg.schemes if s not in skipped]
    group_size = 0
    if "w4a16" in schemes:  # checked before any work
        group_size = recipes.w4a16_group_size(recipes.quantized_in_features(model_dir), cfg.w4a16_group_size)
    calibration = calibration_dataset(tokens, cfg)
    prompt = latency_prompt(tokens, cfg)

    out, report = Path(params.paths.quantized), Path(params.paths.reports) / "quantize"
    with atomic_dir(out) as tmp, atomic_dir(report) as report_tmp, quiet_compressor(report_tmp / COMPRESSOR_LOG):
        seconds = {}
        for scheme in schemes:
            log.info("quantize: %s (%d calibration blocks of %d tokens)", scheme, len(calibration), cfg.calibration_seq_len)
            seconds[scheme] = quantize(model_dir, recipes.modifiers(scheme, cfg, group_size), calibration, cfg, tmp / scheme)
        base = score(BASELINE, model_dir, params, prompt)
        rows = [base] + [{**compare(score(s, tmp / s, params, prompt), base, cfg), "quantize_seconds": seconds[s]} for s in schemes]
        notes = [
            f"Baseline: {model_dir} (unquantized); every row measured in this run on the same data: held-out perplexity "
            f"({params.evaluate.eval_tokens or 'all'} tokens of {tokens / 'val.bin'}, blocks of {params.evaluate.seq_len})"
            + (f", HumanEval pass@1 on {params.evaluate.max_problems} problems" if "pass_at_1" in base else "") + ".",
            f"Calibration: {len(calibration)} blocks of {cfg.calibration_seq_len} tokens from the train split (seed {cfg.seed})"
            + (f"; W4A16 group size {group_size}" if group_size else "") + ".",
            "size MB: the whole directory on disk (weights, config, tokenizer). load MB: peak RSS growth of a fresh process "
            "loading the model and running one forward pass; ms/token: greedy generation, batch 1, "
            f"{cfg.latency_prompt_tokens}-token prompt, {cfg.latency_new_tokens} new tokens, median of {cfg.latency_repeats} runs "
            f"on {base['threads']} CPU threads.",
            "On CPU, transformers decompresses compressed-tensors weights to dense float layers (W8A8 also fake-quantizes "
            "activations): the latency and memory here are those of the decompressed model, not of int8/int4 kernels. "
            "The size column is what the format saves; vLLM on a GPU runs the quantized kernels.",
            *[f"{s}: skipped, {reason}." for s, reason in skipped.items()],
        ]
        (report_tmp / TABLE_FILE).write_text(markdown_table(rows, notes), encoding="utf-8")

    tracking.log_table([{k: r.get(k) for k in rows[-1]} for r in rows], MLFLOW_TABLE)
    metrics: dict[str, Any] = {row["scheme"]: {k: v for k, v in row.items() if k != "scheme"} for row in rows}
    metrics["calibration"] = {"samples": len(calibration), "seq_len": cfg.calibration_seq_len, "w4a16_group_size": group_size}
    metrics["skipped"] = skipped
    parts = [
        f"{r['scheme']} {r['size_ratio']:.2f}x smaller, perplexity {r['perplexity_increase']:+.1%}"
        + ("" if r["within_tolerance"] else f" (OVER the {cfg.max_perplexity_increase:.0%} tolerance)")
        + f", {r['speedup']:.2f}x CPU speed (decompressed)"
        for r in rows[1:]
    ]
    summary = (f"quantize: {'; '.join(parts) or 'no scheme runnable here'}"
               + "".join(f"; {s} skipped ({reason.split(' (')[0]})" for s, reason in skipped.items())
               + f" -> {out}, table {report / TABLE_FILE}")
    return StageResult(metrics=metrics, summary=summary, artifacts=[report])
