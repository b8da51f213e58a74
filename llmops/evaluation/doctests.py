"""Doctest scoring in the execution sandbox, shared by align (pairs, reward, candidate rule) and evaluate: the
corpus's doctest prompts whose reference body passes its checks, each body's share of checked examples passed, and a
model's held-out doctest pass rate (greedy bodies)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops.common.io import read_records
from llmops.common.progress import progress
from llmops.params.evaluate import EvaluateConfig
from llmops.training.instructions import cap_pairs
from llmops.training.preferences import (
    DoctestPrompt,
    doctest_prompts,
    example_programs,
    is_humaneval_prompt,
    pass_shares,
)

EMPTY_BODY = ""  # the function is its docstring alone


def example_outcomes(prompts: list[DoctestPrompt], bodies: list[str], evaluate: EvaluateConfig, *, isolated: bool) -> list[list[bool]]:
    """For each (prompt, body), whether each of the prompt's checked doctest examples passed, one sandboxed program each."""
    from llmops.evaluation.suite import execute

    programs = [program for prompt, body in zip(prompts, bodies, strict=True) for program in example_programs(prompt, body)]
    passed = iter([o.passed for o in execute(programs, evaluate, isolated=isolated)])
    return [[next(passed) for _ in prompt.checked] for prompt in prompts]


def score_bodies(prompts: list[DoctestPrompt], bodies: list[str], evaluate: EvaluateConfig, *, isolated: bool, per_example: bool) -> list[float]:
    """Each (prompt, body) scored in the sandbox: the share of its checked doctest examples that pass (`per_example`,
    one program per example) or 1.0 / 0.0 for all of them passing in one program."""
    from llmops.evaluation.suite import execute

    if per_example:
        outcomes = example_outcomes(prompts, bodies, evaluate, isolated=isolated)
        return pass_shares(prompts, bodies, [passed for per_prompt in outcomes for passed in per_prompt])
    outcomes = execute([(p.program(b), p.all_checks()) for p, b in zip(prompts, bodies, strict=True)], evaluate, isolated=isolated)
    return [float(o.passed) for o in outcomes]


def discriminating(prompts: list[DoctestPrompt], evaluate: EvaluateConfig, *, isolated: bool) -> list[DoctestPrompt]:
    """The prompts with only the doctest examples that an empty body (the docstring alone: the function returns None)
    fails kept as checks; a prompt with none left is dropped. An example such a body passes (a setup line, a call
    that prints nothing) would score any body that merely parses."""
    kept = []
    for prompt, passed in zip(prompts, example_outcomes(prompts, [EMPTY_BODY] * len(prompts), evaluate, isolated=isolated), strict=True):
        checked = tuple(index for index, ok in zip(prompt.checked, passed, strict=True) if not ok)
        if checked:
            kept.append(dataclasses.replace(prompt, checked=checked))
    return kept


def mine_doctest_prompts(
    dedup: Path, max_examples: int, humaneval: list[str], counts: Counter[str], *, keep_source: Callable[[str], bool], desc: str
) -> list[DoctestPrompt]:
    """The doctest prompts of the corpus documents in `dedup` whose id `keep_source` accepts, HumanEval prompts left
    out (counted as humaneval_excluded)."""
    table = read_records(dedup)
    found: list[DoctestPrompt] = []
    docs = [(i, t) for i, t in zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True) if keep_source(i)]
    for doc_id, text in progress(docs, desc=desc, unit="doc"):
        for prompt in doctest_prompts(doc_id, text, max_examples):
            if is_humaneval_prompt(prompt.prompt, humaneval):
                counts["humaneval_excluded"] += 1
                continue
            found.append(prompt)
    return found


def checked_prompts(
    groups: list[list[DoctestPrompt]], limits: list[int], evaluate: EvaluateConfig, *, isolated: bool, counts: Counter[str]
) -> list[list[DoctestPrompt]]:
    """Each group capped at its limit (by id hash; 0 = all), then only the prompts whose reference body passes its
    doctests in the sandbox, with the examples an empty body also passes dropped from the checks (discriminating).
    All groups' programs run in one batch."""
    capped = [cap_pairs(group, limit) for group, limit in zip(groups, limits, strict=True)]  # type: ignore[arg-type]
    candidates = [p for group in capped for p in group]
    passed = score_bodies(candidates, [p.reference for p in candidates], evaluate, isolated=isolated, per_example=False)
    references_pass = [p for p, ok in zip(candidates, passed, strict=True) if ok]
    counts["reference_fails_doctests"] += len(candidates) - len(references_pass)
    kept = {p.id: p for p in discriminating(references_pass, evaluate, isolated=isolated)}
    counts["no_example_fails_an_empty_body"] += len(references_pass) - len(kept)
    return [[kept[p.id] for p in group if p.id in kept] for group in capped]


def doctest_scores(
    model: Any, tokenizer: Any, prompts: list[DoctestPrompt], evaluate: EvaluateConfig, *, max_new_tokens: int, seed: int,
    isolated: bool, desc: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy bodies for `prompts`, each checked doctest example run in the sandbox: the share of examples passed
    (doctest_pass_rate), of prompts with every example passing (doctest_solved_rate), and of bodies that parse; and one
    row per prompt (id, body, doctest_pass_share, syntax_valid)."""
    from llmops.evaluation.generation import complete
    from llmops.evaluation.scoring import syntax_valid

    if not prompts:  # None, not 0: no doctest prompt to score, nothing was measured
        return {"prompts": 0, "doctest_pass_rate": None, "doctest_solved_rate": None, "syntax_valid_rate": None}, []
    bodies = [c[0] for c in complete(
        model, tokenizer, [[{"role": "user", "content": p.prompt}] for p in prompts], samples=1, max_new_tokens=max_new_tokens,
        temperature=1.0, top_p=1.0, batch_size=evaluate.batch_size, seed=seed, desc=desc,
    )]
    shares = score_bodies(prompts, bodies, evaluate, isolated=isolated, per_example=True)
    valid = [syntax_valid(p.prompt, b) for p, b in zip(prompts, bodies, strict=True)]
    rows = [{"id": p.id, "body": b, "doctest_pass_share": s, "syntax_valid": v} for p, b, s, v in zip(prompts, bodies, shares, valid, strict=True)]
    count = len(prompts)
    scores = {
        "prompts": count,
        "doctest_pass_rate": sum(shares) / count,
        "doctest_solved_rate": sum(s == 1.0 for s in shares) / count,
        "syntax_valid_rate": sum(valid) / count,
    }
    return scores, rows
