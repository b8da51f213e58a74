"""The champion/challenger gate: whether a challenger's eval metrics beat the champion's by the rules in
`register.gate` (pure: numbers in, decision and the reason for each check out)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmops.params.register import GateConfig

# pass@1 decides for models that can pass; the HumanEval solution NLL (bits per token) and the held-out doctest pass
# rate move for models too small to pass anything
GATE_METRICS = ("perplexity", "pass_at_1", "humaneval_nll", "doctest_pass_rate")
LM_EVAL_PREFIX = "lm_eval."  # gate metric names of lm-eval results: lm_eval.<task>.<metric>
# lm-eval metrics where lower is better (matched on the metric name's end); every other one is a score
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]  # one line per check: the numbers and the rule
    checks: dict[str, bool] = field(default_factory=dict)  # check name -> passed (only the checks that ran)


def decide(challenger: dict[str, float], champion: dict[str, float] | None, gate: GateConfig) -> Decision:
    """Whether `challenger` replaces `champion`, both scored on the same eval data.

    A check runs when both sides have its metric; the challenger wins only if every check that ran passes
    and at least one ran. No champion at all: the challenger wins.
    """
    if champion is None:
        return Decision(True, ["no champion yet: the first version becomes champion"])
    reasons: list[str] = []
    checks: dict[str, bool] = {}

    def compare(key: str, label: str, bound: Callable[[float], float], higher_is_better: bool, knob: str, missing: str) -> None:
        """One check of `key` against the bound the champion's value gives, or the reason it was not compared."""
        if key not in challenger or key not in champion:
            reasons.append(f"{label} not compared: {missing}")
            return
        limit = bound(champion[key])
        checks[key] = challenger[key] >= limit - 1e-12 if higher_is_better else challenger[key] <= limit
        reasons.append(
            f"{label} {challenger[key]:.4f} vs champion {champion[key]:.4f}: needs {'>=' if higher_is_better else '<='} {limit:.4f} "
            f"({knob}) -> {'ok' if checks[key] else 'FAIL'}"
        )

    compare(
        "pass_at_1", "pass@1", lambda value: value + gate.min_pass_at_1_delta, True, f"min_pass_at_1_delta {gate.min_pass_at_1_delta:+g}",
        "not measured for both (evaluate.max_problems 0, or a re-score without HumanEval)",
    )
    compare(
        "perplexity", "perplexity", lambda value: value * (1 + gate.max_perplexity_increase), False,
        f"max_perplexity_increase {gate.max_perplexity_increase:g}", "not measured for both on the same tokenization",
    )
    for key, min_delta in gate.lm_eval.items():
        name = LM_EVAL_PREFIX + key
        if name not in challenger or name not in champion:
            reasons.append(f"{name} not compared: not measured for both (evaluate.lm_eval, or a re-score without lm-eval)")
            continue
        lower = key.endswith(LOWER_IS_BETTER)
        improvement = champion[name] - challenger[name] if lower else challenger[name] - champion[name]
        checks[name] = improvement >= min_delta - 1e-12
        bound = champion[name] - min_delta if lower else champion[name] + min_delta
        reasons.append(
            f"{name} {challenger[name]:.4f} vs champion {champion[name]:.4f}: needs {'<=' if lower else '>='} {bound:.4f} "
            f"(register.gate.lm_eval {min_delta:+g}) -> {'ok' if checks[name] else 'FAIL'}"
        )
    compare(
        "humaneval_nll", "HumanEval solution NLL (bits/token)", lambda value: value * (1 + gate.max_humaneval_nll_increase), False,
        f"max_humaneval_nll_increase {gate.max_humaneval_nll_increase:g}",
        "not measured for both (evaluate.max_problems 0, or a re-score across tokenizers)",
    )
    compare(
        "doctest_pass_rate", "held-out doctest pass rate", lambda value: value + gate.min_doctest_pass_rate_delta, True,
        f"min_doctest_pass_rate_delta {gate.min_doctest_pass_rate_delta:+g}",
        "not measured for both (evaluate.doctest_prompts 0, no held-out doctest prompt, or a champion re-scored on other data)",
    )
    if not checks:
        return Decision(False, [*reasons, "no gate metric could be compared: the champion stays"], checks)
    return Decision(all(checks.values()), reasons, checks)


def gate_metrics(eval_metrics: dict[str, Any]) -> dict[str, float]:
    """The gate's numbers from metrics/eval.json: perplexity, pass@1, the HumanEval solution NLL (bits per token), the
    held-out doctest pass rate (when there were prompts to score), and every lm-eval metric as lm_eval.<task>.<metric>."""
    out = {"perplexity": float(eval_metrics["perplexity"]["perplexity"])}
    humaneval = eval_metrics.get("humaneval") or {}
    if "pass_at_1" in humaneval:
        out["pass_at_1"] = float(humaneval["pass_at_1"])
    if "nll_bits_per_token" in humaneval:
        out["humaneval_nll"] = float(humaneval["nll_bits_per_token"])
    if (eval_metrics.get("doctest") or {}).get("pass_rate") is not None:
        out["doctest_pass_rate"] = float(eval_metrics["doctest"]["pass_rate"])
    for task, values in (eval_metrics.get("lm_eval") or {}).items():
        out |= {f"{LM_EVAL_PREFIX}{task}.{metric}": float(value) for metric, value in values.items()}
    return out
