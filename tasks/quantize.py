"""quantize: llm-compressor schemes (W8A8 SmoothQuant+GPTQ, W4A16 GPTQ, W4A16 AWQ, FP8 dynamic on a GPU) applied to the fine-tuned
model with calibration blocks from the train split; each variant scored with evaluate's code against the unquantized
model in the same run.

Reads models/finetune/ and data/tokens/; writes models/quantized/<scheme>/ (compressed-tensors HF directories, the
format vLLM loads), reports/quantize/table.md (+ llm-compressor's log), an MLflow table, and returns the metrics that
the runner writes to metrics/quantize.json.
"""

from __future__ import annotations

import logging
from typing import Any

from llmops.common.errors import DataError
from llmops.common.io import atomic_dir
from llmops.common.progress import quiet_libraries
from llmops.common.results import StageResult
from llmops.training.candidate import candidate_model_dir
from llmops.params.evaluate import EvaluateConfig
from llmops.params.paths import PathsConfig
from llmops.params.quantize import QuantizeConfig
from llmops.quantization import recipes
from llmops.quantization.compress import calibration_dataset, latency_prompt, quantize
from llmops.quantization.console import quiet_compressor
from llmops.quantization.table import BASELINE, compare, markdown_table, score

log = logging.getLogger("llmops.quantize")
TABLE_FILE = "table.md"
VARIANTS_FILE = "variants.tsv"  # scheme, perplexity, size_mb, ms_per_token: the bar plots of dvc.yaml
MLFLOW_TABLE = "quantize_table.json"
COMPRESSOR_LOG = "llmcompressor.log"


def run(cfg: QuantizeConfig, evaluate: EvaluateConfig, paths: PathsConfig) -> StageResult:
    from llmops.common import tracking

    quiet_libraries()
    model_dir, tokens = candidate_model_dir(paths.finetune_model, paths.aligned_model, paths.metrics), paths.tokens
    if not (model_dir / "config.json").exists():
        raise DataError(f"{model_dir}: no fine-tuned model (config.json missing); run the finetune stage first.")
    skipped = {s: reason for s in cfg.schemes if (reason := recipes.unavailable(s))}
    for scheme, reason in skipped.items():
        log.warning("quantize: skipping %s: %s", scheme, reason)
    schemes = [s for s in cfg.schemes if s not in skipped]
    group_size, mappings = 0, None  # both checked before any work
    if {"w4a16", "awq"} & set(schemes):
        group_size = recipes.w4a16_group_size(recipes.quantized_in_features(model_dir), cfg.w4a16_group_size)
    if "awq" in schemes:
        mappings = recipes.awq_mappings(model_dir)
    calibration = calibration_dataset(tokens, cfg)
    prompt = latency_prompt(tokens, cfg)

    out, report = paths.quantized, paths.reports / "quantize"
    with atomic_dir(out) as tmp, atomic_dir(report) as report_tmp, quiet_compressor(report_tmp / COMPRESSOR_LOG):
        seconds = {}
        for scheme in schemes:
            log.info("quantize: %s (%d calibration blocks of %d tokens)", scheme, len(calibration), cfg.calibration_seq_len)
            seconds[scheme] = quantize(model_dir, recipes.modifiers(scheme, cfg, group_size, mappings), calibration, cfg, tmp / scheme)
        base = score(BASELINE, model_dir, cfg, evaluate, tokens, prompt)
        rows = [base] + [{**compare(score(s, tmp / s, cfg, evaluate, tokens, prompt), base, cfg), "quantize_seconds": seconds[s]} for s in schemes]
        notes = [
            f"Baseline: {paths.relative(model_dir)} (unquantized); every row measured in this run on the same data: held-out perplexity "
            f"({evaluate.eval_tokens or 'all'} tokens of the val split in {paths.relative(tokens)}, blocks of {evaluate.seq_len})"
            + (f", HumanEval pass@1 on {evaluate.max_problems} problems" if "pass_at_1" in base else "") + ".",
            f"Calibration: {len(calibration)} blocks of {cfg.calibration_seq_len} tokens from the train split (seed {cfg.seed})"
            + (f"; int4 group size {group_size}" if group_size else "") + ".",
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
        # one row per variant, for dvc.yaml's `quantize_variants` bar plots (`dvc plots show` / `dvc plots diff`)
        columns = ("scheme", "perplexity", "size_mb", "ms_per_token")
        tsv = ["\t".join(columns), *("\t".join(str(row.get(c, "")) for c in columns) for row in rows)]
        (report_tmp / VARIANTS_FILE).write_text("\n".join(tsv) + "\n", encoding="utf-8")

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
    return StageResult(metrics=metrics, summary=summary, artifacts=[report], facts=("calibration", *(f"{row['scheme']}.threads" for row in rows)))
