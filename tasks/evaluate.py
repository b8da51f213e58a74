"""evaluate: held-out perplexity (and the base model's, for comparison), HumanEval pass@k with sandboxed execution,
syntax / exact / fuzzy match of generated bodies on the fine-tune eval split, and the lm-evaluation-harness tasks in
evaluate.lm_eval (metrics `lm_eval.<task>.<metric>`).

Reads models/finetune/ (and the pretrained base), data/tokens/val.bin and data/instructions/eval.jsonl; writes
reports/evaluate/samples.jsonl (every generation with its verdict) and reports/evaluate/lm_eval.json (lm-eval's full
results), logs the samples as an MLflow table, and returns the metrics the runner writes to metrics/eval.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmops.common.errors import DataError
from llmops.common.io import atomic_dir
from llmops.common.progress import quiet_libraries
from llmops.common.results import StageResult
from llmops.training.candidate import candidate_model_dir
from llmops.evaluation import lm_eval
from llmops.evaluation.suite import held_out_perplexity, humaneval, instruction_match
from llmops.params.evaluate import EvaluateConfig
from llmops.params.model import ModelConfig
from llmops.params.paths import PathsConfig

# how much was scored, and how: MLflow params, not metrics
EVALUATE_FACTS = ("perplexity.tokens", "base_perplexity.tokens", "humaneval.problems", "humaneval.samples_per_problem", "humaneval.sandboxed", "instructions.pairs")

SAMPLES_FILE = "samples.jsonl"
TABLE_FILE = "eval_samples.json"  # the MLflow table artifact


def base_model_dir(base_model: ModelConfig, paths: PathsConfig) -> Path | None:
    """The model fine-tuning started from, when there is one on disk to compare against."""
    path = Path(base_model.base_at(paths.root)) if base_model.base else paths.pretrain_model
    return path if (path / "config.json").exists() else None


def run(cfg: EvaluateConfig, base_model: ModelConfig, paths: PathsConfig) -> StageResult:
    from llmops.common import tracking
    from llmops.evaluation.generation import load_model

    quiet_libraries()
    if cfg.lm_eval:
        lm_eval.task_manager(cfg.lm_eval)  # an unknown task name fails here, before any scoring
    model_dir = candidate_model_dir(paths.finetune_model, paths.aligned_model, paths.metrics)
    if not (model_dir / "config.json").exists():
        raise DataError(f"{model_dir}: no fine-tuned model (config.json missing); run the finetune stage first.")
    metrics: dict[str, Any] = {"perplexity": held_out_perplexity(model_dir, paths.tokens, cfg, "evaluate: perplexity (finetune)")}
    base = base_model_dir(base_model, paths) if cfg.compare_base else None
    if base is not None:
        metrics["base_perplexity"] = held_out_perplexity(base, paths.tokens, cfg, "evaluate: perplexity (base)")

    model, tokenizer = load_model(model_dir)
    rows: list[dict[str, Any]] = []
    if cfg.max_problems:
        metrics["humaneval"], he_rows = humaneval(model, tokenizer, cfg)
        rows += he_rows
    metrics["instructions"], pair_rows = instruction_match(model, tokenizer, cfg, paths.instructions / "eval.jsonl")
    rows += pair_rows
    lm_eval_results = lm_eval.score_candidate(model_dir, cfg, paths.tokens, paths.tokenizer) if cfg.lm_eval else None
    if lm_eval_results is not None:
        metrics["lm_eval"] = lm_eval.task_metrics(lm_eval_results)

    out = paths.reports / "evaluate"
    with atomic_dir(out) as tmp:
        with open(tmp / SAMPLES_FILE, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if lm_eval_results is not None:
            lm_eval.write_results(lm_eval_results, tmp / lm_eval.RESULTS_FILE)
    tracking.log_table(rows, TABLE_FILE)

    he = metrics.get("humaneval")
    ppl = metrics["perplexity"]["perplexity"]
    summary = f"evaluate: perplexity {ppl:.2f}"
    if base is not None:
        summary += f" (base {metrics['base_perplexity']['perplexity']:.2f})"
    if he:
        summary += (
            f", HumanEval pass@1 {he.get('pass_at_1', float('nan')):.3f} on {he['problems']} problems x {he['samples_per_problem']} "
            f"({'sandboxed' if he['sandboxed'] else 'NOT sandboxed'})"
        )
    ins = metrics["instructions"]
    summary += f", eval split: {ins['pairs']} pairs, syntax-valid {ins['syntax_valid_rate']:.2f}, exact {ins['exact_match']:.2f}, fuzzy {ins['fuzzy_match']:.2f}"
    artifacts = [out / SAMPLES_FILE]
    if lm_eval_results is not None:
        scores = "; ".join(f"{task} " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()) for task, values in metrics["lm_eval"].items())
        summary += f", lm-eval: {scores}"
        artifacts.append(out / lm_eval.RESULTS_FILE)
    summary += f" -> {out}"
    return StageResult(metrics=metrics, summary=summary, artifacts=artifacts, facts=EVALUATE_FACTS)
