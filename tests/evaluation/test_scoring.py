"""pass@k (unbiased estimator), stop sequences and the eval-split match scores, on values known by hand."""

from __future__ import annotations

import itertools

import pytest

from llmops.evaluation.scoring import (
    exact_match,
    fuzzy_match,
    humaneval_program,
    pass_at_k,
    syntax_valid,
    truncate_at_stop,
)

pytestmark = pytest.mark.eval


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_matches_known_values():
    assert pass_at_k([10], [3], 1) == pytest.approx(0.3)
    assert pass_at_k([10], [3], 10) == pytest.approx(1.0)
    assert pass_at_k([5], [0], 1) == 0.0
    assert pass_at_k([5], [0], 5) == 0.0
    assert pass_at_k([1, 1, 1, 1], [1, 0, 0, 1], 1) == pytest.approx(0.5)


@pytest.mark.parametrize("n,c,k", [(10, 3, 2), (10, 3, 5), (8, 1, 3), (7, 6, 2), (6, 0, 2), (9, 9, 4), (12, 5, 7)])
def test_pass_at_k_equals_brute_force_combinatorics(n, c, k):
    assert pass_at_k([n], [c], k) == pytest.approx(brute_force_pass_at_k(n, c, k))


def test_pass_at_k_is_the_mean_over_problems():
    expected = (brute_force_pass_at_k(6, 2, 3) + brute_force_pass_at_k(6, 5, 3)) / 2
    assert pass_at_k([6, 6], [2, 5], 3) == pytest.approx(expected)


def test_pass_at_k_refuses_k_above_the_samples():
    with pytest.raises(ValueError, match="pass@3 needs at least 3 samples"):
        pass_at_k([2], [1], 3)


def test_completion_is_cut_at_the_first_stop_sequence():
    body = "    return a + b\n"
    assert truncate_at_stop(body + "\ndef other():\n    pass\n") == body
    assert truncate_at_stop(body + "\nif __name__ == '__main__':\n    main()") == body
    assert truncate_at_stop(body + "\nprint(add(1, 2))") == body
    assert truncate_at_stop(body + "\nclass X:\n    pass") == body
    assert truncate_at_stop(body) == body


def test_humaneval_program_is_prompt_completion_tests_and_check():
    problem = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"}
    program = humaneval_program(problem, "    return a + b\n")
    namespace: dict = {}
    exec(program, namespace)  # a trusted, hand-written program: the check passes without raising
    assert program.rstrip().endswith("check(add)")


def test_prompts_keep_their_end_and_fit_the_context_where_they_can():
    from llmops.evaluation.generation import prompt_budget

    assert prompt_budget(256, 128) == 128
    assert prompt_budget(2048, 128) == 1920
    assert prompt_budget(32, 128) == 16  # a tiny context: half of it still goes to the prompt
    assert prompt_budget(1, 128) == 1


def test_syntax_exact_and_fuzzy_match():
    prompt = 'def f(x):\n    """Double."""\n'
    assert syntax_valid(prompt, "    return 2 * x\n")
    assert not syntax_valid(prompt, "    return 2 *\n")
    assert not syntax_valid(prompt, "  \n"), "an empty body is not a generated body"
    assert exact_match("    return 2 * x   \n\n", "    return 2 * x\n")
    assert not exact_match("    return x * 2\n", "    return 2 * x\n")
    assert fuzzy_match("    return 2 * x\n", "    return 2 * x\n") == 1.0
    assert 0.5 < fuzzy_match("    return 2 * y\n", "    return 2 * x\n") < 1.0
    assert fuzzy_match("", "    return 2 * x\n") == 0.0
