"""The champion/challenger gate on lm-eval metrics named in register.gate.lm_eval: scores must not drop below the
champion's plus the delta, perplexities must not rise above its minus the delta; an empty mapping changes nothing."""

from __future__ import annotations

import pytest

from llmops.params.register import GateConfig
from llmops.registry.gate import decide, gate_metrics

pytestmark = pytest.mark.unit

CHAMPION = {"pass_at_1": 0.20, "perplexity": 10.0, "lm_eval.llmops_humaneval.pass_at_1": 0.30, "lm_eval.llmops_heldout_ppl.word_perplexity": 40.0}
GATE = GateConfig(lm_eval={"llmops_humaneval.pass_at_1": 0.0, "llmops_heldout_ppl.word_perplexity": 0.0})


def challenger(**lm_eval: float) -> dict[str, float]:
    base = {"pass_at_1": 0.20, "perplexity": 10.0, "lm_eval.llmops_humaneval.pass_at_1": 0.30, "lm_eval.llmops_heldout_ppl.word_perplexity": 40.0}
    return base | {f"lm_eval.{k.replace('__', '.')}": v for k, v in lm_eval.items()}


def test_a_lower_lm_eval_score_is_refused_and_the_reason_names_the_numbers():
    decision = decide(challenger(llmops_humaneval__pass_at_1=0.25), CHAMPION, GATE)
    assert not decision.promote
    assert decision.checks == {"pass_at_1": True, "perplexity": True, "lm_eval.llmops_humaneval.pass_at_1": False, "lm_eval.llmops_heldout_ppl.word_perplexity": True}
    assert "lm_eval.llmops_humaneval.pass_at_1 0.2500 vs champion 0.3000: needs >= 0.3000" in decision.reasons[2] and "FAIL" in decision.reasons[2]


def test_a_perplexity_metric_must_not_rise():
    assert decide(challenger(llmops_heldout_ppl__word_perplexity=39.0), CHAMPION, GATE).promote
    refused = decide(challenger(llmops_heldout_ppl__word_perplexity=41.0), CHAMPION, GATE)
    assert not refused.promote and refused.checks["lm_eval.llmops_heldout_ppl.word_perplexity"] is False
    assert "needs <= 40.0000" in refused.reasons[3]


def test_a_positive_delta_demands_an_improvement_and_a_negative_one_allows_a_regression():
    strict = GateConfig(lm_eval={"llmops_humaneval.pass_at_1": 0.05})
    assert not decide(challenger(), CHAMPION, strict).promote
    assert decide(challenger(llmops_humaneval__pass_at_1=0.35), CHAMPION, strict).promote
    lenient = GateConfig(lm_eval={"llmops_heldout_ppl.word_perplexity": -2.0})
    assert decide(challenger(llmops_heldout_ppl__word_perplexity=42.0), CHAMPION, lenient).promote
    assert not decide(challenger(llmops_heldout_ppl__word_perplexity=42.5), CHAMPION, lenient).promote


def test_a_gate_key_missing_on_one_side_is_not_compared():
    champion = {k: v for k, v in CHAMPION.items() if not k.startswith("lm_eval.")}
    decision = decide(challenger(llmops_humaneval__pass_at_1=0.0), champion, GATE)
    assert decision.promote and set(decision.checks) == {"pass_at_1", "perplexity"}
    assert "lm_eval.llmops_humaneval.pass_at_1 not compared" in decision.reasons[2]


def test_an_empty_mapping_gives_the_decision_and_reasons_of_the_gate_without_lm_eval():
    worse = challenger(llmops_humaneval__pass_at_1=0.0)
    plain = {k: v for k, v in worse.items() if not k.startswith("lm_eval.")}
    assert decide(worse, CHAMPION, GateConfig()) == decide(plain, CHAMPION, GateConfig())
    assert decide(worse, CHAMPION, GateConfig()).promote


def test_gate_metrics_reads_lm_eval_metrics_from_eval_json():
    eval_json = {
        "perplexity": {"perplexity": 12.5},
        "humaneval": {"pass_at_1": 0.1},
        "lm_eval": {"llmops_humaneval": {"pass_at_1": 0.2}, "llmops_heldout_ppl": {"word_perplexity": 30.0, "bits_per_byte": 1.5}},
    }
    assert gate_metrics(eval_json) == {
        "perplexity": 12.5, "pass_at_1": 0.1, "lm_eval.llmops_humaneval.pass_at_1": 0.2,
        "lm_eval.llmops_heldout_ppl.word_perplexity": 30.0, "lm_eval.llmops_heldout_ppl.bits_per_byte": 1.5,
    }


def test_champion_tags_give_back_the_lm_eval_gate_metrics():
    """A champion registered with lm-eval scores is compared on them: its version tags hold what the gate reads."""
    from llmops.registry.promotion import tagged_gate_metrics

    tags = {
        "llmops.metric.perplexity": "12.5",
        "llmops.metric.pass_at_1": "0.25",
        "llmops.metric.lm_eval.llmops_humaneval.pass_at_1": "0.3",
        "llmops.metric.eval.instructions.exact_match": "0.1",  # the whole eval.json rides along, not a gate metric
        "llmops.metric.quantize.size_ratio": "0.5",
        "llmops.eval_data": "abc",
    }
    assert tagged_gate_metrics(tags) == {"perplexity": 12.5, "pass_at_1": 0.25, "lm_eval.llmops_humaneval.pass_at_1": 0.3}
