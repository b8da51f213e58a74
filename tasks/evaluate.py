"""evaluate: held-out perplexity, HumanEval pass@k with sandboxed execution, the syntax-valid rate of the HumanEval
bodies and the NLL of HumanEval's canonical solutions, the doctest pass rate on the held-out doctest prompts (those of
finetune's held-out source files, run in the sandbox), syntax / exact / fuzzy match of generated bodies on the
fine-tune eval split, and the lm-evaluation-harness tasks in evaluate.lm_eval (metrics `lm_eval.<task>.<metric>`).
The base model gets the same perplexity, HumanEval and doctest scores (`base_*`) for comparison: the NLL, syntax and
doctest scores move at sizes where pass@1 is 0 for every model.

Reads models/finetune/ (and the pretrained base), data/tokens/ (the val token shards), data/dedup and data/instructions/eval.jsonl; writes
reports/evaluate/samples.jsonl (every generation with its verdict) and reports/evaluate/lm_eval.json (lm-eval's full
results), logs the samples as an MLflow table, and returns the metrics the runner writes to metrics/eval.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from llmops.common.errors import DataError
from llmops.common.io import atomic_dir
from llmops.common.progress import quiet_libraries
from llmops.common.results import StageResult
from llmops.evaluation import lm_eval
from llmops.evaluation.doctests import (
    checked_prompts,
    doctest_scores,
    mine_doctest_prompts,
)
from llmops.evaluation.suite import (
    held_out_perplexity,
    humaneval,
    instruction_match,
    sandbox_mode,
)
from llmops.params.evaluate import EvaluateConfig
from llmops.params.finetune import FinetuneConfig
from llmops.params.model import ModelConfig
from llmops.params.paths import PathsConfig
from llmops.params.train import TrainConfig
from llmops.training.candidate import candidate_model_dir
from llmops.training.instructions import in_eval_split
from llmops.training.preferences import DoctestPrompt, humaneval_prompts

# how much was scored, and how: MLflow params, not metrics
EVALUATE_FACTS = (
    "perplexity.tokens", "base_perplexity.tokens", "humaneval.problems", "humaneval.samples_per_problem", "humaneval.sandboxed",
    "humaneval.nll_tokens", "doctest.prompts", "instructions.pairs",
)  # fmt: skip

SAMPLES_FILE = "samples.jsonl"
TABLE_FILE = "eval_samples.json"  # the MLflow table artifact


def base_model_dir(base_model: ModelConfig, paths: PathsConfig) -> Path | None:
    """The model fine-tuning started from, when there is one on disk to compare against."""
    path = Path(base_model.base_at(paths.root)) if base_model.base else paths.pretrain_model
    return path if (path / "config.json").exists() else None


def heldout_doctest_prompts(cfg: EvaluateConfig, finetune: FinetuneConfig, seed: int, dedup: Path, isolated: bool) -> tuple[list[DoctestPrompt], dict[str, int]]:
    """Up to evaluate.doctest_prompts doctest prompts (by id hash) of finetune's held-out source files (the ones align
    holds out too) whose reference body passes its doctests, and the counts of what was left out."""
    counts: Counter[str] = Counter()
    found = mine_doctest_prompts(
        dedup, cfg.doctest_examples, humaneval_prompts(), counts, keep_source=lambda source: in_eval_split(source, finetune.eval_fraction, seed),
        desc="evaluate: mining held-out doctest prompts",
    )
    counts["mined"] = len(found)
    [prompts] = checked_prompts([found], [cfg.doctest_prompts], cfg, isolated=isolated, counts=counts)
    return prompts, dict(sorted(counts.items()))


def doctest_metrics(model: Any, tokenizer: Any, prompts: list[DoctestPrompt], cfg: EvaluateConfig, isolated: bool, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The model's greedy bodies on `prompts` scored in the sandbox: pass_rate (share of checked examples passed),
    solved_rate (share of prompts with all passing), syntax_valid_rate; and one samples row per prompt."""
    scores, rows = doctest_scores(
        model, tokenizer, prompts, cfg, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, isolated=isolated, desc=f"evaluate: doctest bodies ({name})"
    )
    metrics = {
        "prompts": scores["prompts"], "pass_rate": scores["doctest_pass_rate"], "solved_rate": scores["doctest_solved_rate"],
        "syntax_valid_rate": scores["syntax_valid_rate"],
    }  # fmt: skip
    by_id = {p.id: p for p in prompts}
    samples = [
        {
            "kind": "doctest", "task": r["id"], "prompt": by_id[r["id"]].prompt, "output": r["body"], "passed": r["doctest_pass_share"] == 1.0,
            "status": "syntax_valid" if r["syntax_valid"] else "syntax_error", "detail": f"doctest_pass_share={r['doctest_pass_share']:.3f}",
        }
        for r in rows
    ]  # fmt: skip
    return metrics, samples


def run(cfg: EvaluateConfig, base_model: ModelConfig, finetune: FinetuneConfig, train: TrainConfig, paths: PathsConfig) -> StageResult:
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

    doctests: list[DoctestPrompt] = []
    if cfg.doctest_prompts:
        isolated = sandbox_mode(cfg)  # before any work: fail fast
        doctests, metrics["doctest_counts"] = heldout_doctest_prompts(cfg, finetune, train.seed, paths.dedup, isolated)

    model, tokenizer = load_model(model_dir)
    rows: list[dict[str, Any]] = []
    if cfg.max_problems:
        metrics["humaneval"], he_rows = humaneval(model, tokenizer, cfg)
        rows += he_rows
    metrics["instructions"], pair_rows = instruction_match(model, tokenizer, cfg, paths.instructions / "eval.jsonl")
    rows += pair_rows
    if cfg.doctest_prompts:
        metrics["doctest"], doctest_rows = doctest_metrics(model, tokenizer, doctests, cfg, isolated, "candidate")
        rows += doctest_rows
    if base is not None and (cfg.max_problems or cfg.doctest_prompts):
        base_lm, base_tokenizer = load_model(base)
        if cfg.max_problems:
            metrics["base_humaneval"], _ = humaneval(base_lm, base_tokenizer, cfg)
        if cfg.doctest_prompts:
            metrics["base_doctest"], _ = doctest_metrics(base_lm, base_tokenizer, doctests, cfg, isolated, "base")
        del base_lm  # freed before lm-eval loads the candidate again
    lm_eval_results = lm_eval.score_candidate(model_dir, cfg, paths.tokens, paths.tokenizer) if cfg.lm_eval else None
    if lm_eval_results is not None:
        metrics["lm_eval"] = lm_eval.task_metrics(lm_eval_results)

    out = paths.reports / "evaluate"
    with atomic_dir(out) as tmp:
        with open(tmp / SAMPLES_FILE, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if lm_eval_results is not None:
            lm_eval.write_results(lm_eval_results, tmp / lm_eval.RESULTS_FILE, paths.root)
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
    if he:
        summary += f", solution NLL {he['nll_bits_per_token']:.3f} bits/token"
        if "base_humaneval" in metrics:
            summary += f" (base {metrics['base_humaneval']['nll_bits_per_token']:.3f})"
        summary += f", syntax-valid {he['syntax_valid_rate']:.2f}"
    if (dt := metrics.get("doctest")) and dt["prompts"]:
        summary += f", doctests: pass rate {dt['pass_rate']:.3f}, solved {dt['solved_rate']:.3f} on {dt['prompts']} held-out prompts"
        if "base_doctest" in metrics:
            summary += f" (base pass rate {metrics['base_doctest']['pass_rate']:.3f})"
    elif "doctest" in metrics:
        summary += ", doctests: no held-out doctest prompt to score"
    ins = metrics["instructions"]
    summary += f", eval split: {ins['pairs']} pairs, syntax-valid {ins['syntax_valid_rate']:.2f}, exact {ins['exact_match']:.2f}, fuzzy {ins['fuzzy_match']:.2f}"
    artifacts = [out / SAMPLES_FILE]
    if lm_eval_results is not None:
        scores = "; ".join(f"{task} " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()) for task, values in metrics["lm_eval"].items())
        summary += f", lm-eval: {scores}"
        artifacts.append(out / lm_eval.RESULTS_FILE)
    summary += f" -> {out}"
    return StageResult(metrics=metrics, summary=summary, artifacts=artifacts, facts=EVALUATE_FACTS)
