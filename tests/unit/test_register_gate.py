"""The champion/challenger gate as a pure function: numbers in, decision and reasons out."""

from __future__ import annotations

import pytest

from llmops.params.register import GateConfig
from llmops.registry.gate import decide, gate_metrics

pytestmark = pytest.mark.unit

GATE = GateConfig(min_pass_at_1_delta=0.0, max_perplexity_increase=0.05)
CHAMPION = {"pass_at_1": 0.20, "perplexity": 10.0}


def test_first_version_is_promoted_without_a_champion():
    decision = decide({"pass_at_1": 0.0, "perplexity": 500.0}, None, GATE)
    assert decision.promote and "no champion yet" in decision.reasons[0]


def test_better_challenger_is_promoted():
    decision = decide({"pass_at_1": 0.25, "perplexity": 9.0}, CHAMPION, GATE)
    assert decision.promote
    assert decision.checks == {"pass_at_1": True, "perplexity": True}


def test_lower_pass_at_1_is_refused_and_the_reason_names_the_numbers():
    decision = decide({"pass_at_1": 0.15, "perplexity": 9.0}, CHAMPION, GATE)
    assert not decision.promote
    assert decision.checks == {"pass_at_1": False, "perplexity": True}
    assert "pass@1 0.1500 vs champion 0.2000: needs >= 0.2000" in decision.reasons[0] and "FAIL" in decision.reasons[0]


def test_perplexity_within_the_allowed_increase_passes_and_beyond_it_fails():
    assert decide({"pass_at_1": 0.20, "perplexity": 10.49}, CHAMPION, GATE).promote
    refused = decide({"pass_at_1": 0.20, "perplexity": 10.51}, CHAMPION, GATE)
    assert not refused.promote and refused.checks == {"pass_at_1": True, "perplexity": False}
    assert "needs <= 10.5000" in refused.reasons[1]


def test_min_pass_at_1_delta_demands_a_strict_improvement():
    strict = GateConfig(min_pass_at_1_delta=0.05, max_perplexity_increase=0.05)
    assert not decide({"pass_at_1": 0.20, "perplexity": 10.0}, CHAMPION, strict).promote
    assert decide({"pass_at_1": 0.25, "perplexity": 10.0}, CHAMPION, strict).promote


def test_a_metric_missing_on_one_side_is_not_compared():
    decision = decide({"perplexity": 9.0}, CHAMPION, GATE)
    assert decision.promote and decision.checks == {"perplexity": True}
    assert "pass@1 not compared" in decision.reasons[0]


def test_nothing_comparable_keeps_the_champion():
    decision = decide({"pass_at_1": 0.9}, {"perplexity": 10.0}, GATE)
    assert not decision.promote and decision.checks == {}
    assert "the champion stays" in decision.reasons[-1]


def test_gate_metrics_reads_eval_json():
    eval_json = {"perplexity": {"perplexity": 12.5, "loss": 2.5}, "humaneval": {"pass_at_1": 0.1, "pass_at_10": 0.3}}
    assert gate_metrics(eval_json) == {"perplexity": 12.5, "pass_at_1": 0.1}
    assert gate_metrics({"perplexity": {"perplexity": 3.0}}) == {"perplexity": 3.0}


def test_humaneval_nll_within_the_allowed_increase_passes_and_beyond_it_fails():
    champion = {"perplexity": 10.0, "humaneval_nll": 4.0}
    assert decide({"perplexity": 10.0, "humaneval_nll": 4.19}, champion, GATE).checks == {"perplexity": True, "humaneval_nll": True}
    refused = decide({"perplexity": 10.0, "humaneval_nll": 4.21}, champion, GATE)
    assert not refused.promote and refused.checks == {"perplexity": True, "humaneval_nll": False}
    assert any("HumanEval solution NLL (bits/token) 4.2100 vs champion 4.0000: needs <= 4.2000" in r and "FAIL" in r for r in refused.reasons)


def test_a_lower_humaneval_nll_promotes_a_challenger_that_cannot_pass_anything():
    decision = decide({"pass_at_1": 0.0, "perplexity": 10.0, "humaneval_nll": 3.0}, {"pass_at_1": 0.0, "perplexity": 10.0, "humaneval_nll": 4.0}, GATE)
    assert decision.promote and decision.checks == {"pass_at_1": True, "perplexity": True, "humaneval_nll": True}


def test_doctest_pass_rate_below_the_champion_fails_and_an_equal_one_passes():
    champion = {"perplexity": 10.0, "doctest_pass_rate": 0.25}
    assert decide({"perplexity": 10.0, "doctest_pass_rate": 0.25}, champion, GATE).promote
    refused = decide({"perplexity": 10.0, "doctest_pass_rate": 0.2}, champion, GATE)
    assert not refused.promote and refused.checks == {"perplexity": True, "doctest_pass_rate": False}
    assert any("held-out doctest pass rate 0.2000 vs champion 0.2500: needs >= 0.2500" in r for r in refused.reasons)


def test_min_doctest_pass_rate_delta_demands_an_improvement():
    strict = GateConfig(min_doctest_pass_rate_delta=0.1)
    champion = {"doctest_pass_rate": 0.25}
    assert not decide({"doctest_pass_rate": 0.3}, champion, strict).promote
    assert decide({"doctest_pass_rate": 0.35}, champion, strict).promote


def test_the_small_scale_metrics_are_not_compared_when_one_side_lacks_them():
    decision = decide({"perplexity": 9.0, "humaneval_nll": 9.0, "doctest_pass_rate": 0.0}, CHAMPION, GATE)
    assert decision.promote and decision.checks == {"perplexity": True}  # a worse NLL and pass rate than nothing: not compared
    assert any("HumanEval solution NLL (bits/token) not compared" in r for r in decision.reasons)
    assert any("doctest pass rate not compared" in r for r in decision.reasons)


def test_gate_metrics_reads_the_small_scale_metrics_from_eval_json():
    eval_json = {
        "perplexity": {"perplexity": 12.5},
        "humaneval": {"pass_at_1": 0.0, "nll_bits_per_token": 4.5, "syntax_valid_rate": 0.1},
        "doctest": {"prompts": 6, "pass_rate": 0.125, "solved_rate": 0.0},
        "base_humaneval": {"nll_bits_per_token": 5.0},
    }
    assert gate_metrics(eval_json) == {"perplexity": 12.5, "pass_at_1": 0.0, "humaneval_nll": 4.5, "doctest_pass_rate": 0.125}
    no_prompts = {"perplexity": {"perplexity": 3.0}, "doctest": {"prompts": 0, "pass_rate": None}}
    assert gate_metrics(no_prompts) == {"perplexity": 3.0}


def test_champion_tags_give_back_the_small_scale_gate_metrics():
    from llmops.registry.promotion import tagged_gate_metrics

    tags = {"llmops.metric.humaneval_nll": "4.5", "llmops.metric.doctest_pass_rate": "0.125", "llmops.metric.eval.doctest.solved_rate": "0.0"}
    assert tagged_gate_metrics(tags) == {"humaneval_nll": 4.5, "doctest_pass_rate": 0.125}
