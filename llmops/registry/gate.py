"""The champion/challenger gate: whether a challenger's eval metrics beat the champion's by the rules in
`register.gate` (pure: numbers in, decision and the reason for each check out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmops.params.register import GateConfig

GATE_METRICS = ("perplexity", "pass_at_1")
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
    reasons, checks = [], {}
    if "pass_at_1" in challenger and "pass_at_1" in champion:
        floor = champion["pass_at_1"] + gate.min_pass_at_1_delta
        checks["pass_at_1"] = challenger["pass_at_1"] >= floor - 1e-12
        reasons.append(
            f"pass@1 {challenger['pass_at_1']:.4f} vs champion {champion['pass_at_1']:.4f}: needs >= {floor:.4f} "
            f"(min_pass_at_1_delta {gate.min_pass_at_1_delta:+g}) -> {'ok' if checks['pass_at_1'] else 'FAIL'}"
        )
    else:
        reasons.append("pass@1 not compared: not measured for both (evaluate.max_problems 0, or a re-score without HumanEval)")
    if "perplexity" in challenger and "perplexity" in champion:
        ceiling = champion["perplexity"] * (1 + gate.max_perplexity_increase)
        checks["perplexity"] = challenger["perplexity"] <= ceiling
        reasons.append(
            f"perplexity {challenger['perplexity']:.4f} vs champion {champion['perplexity']:.4f}: needs <= {ceiling:.4f} "
            f"(max_perplexity_increase {gate.max_perplexity_increase:g}) -> {'ok' if checks['perplexity'] else 'FAIL'}"
        )
    else:
        reasons.append("perplexity not compared: not measured for both on the same tokenization")
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
    if not checks:
        return Decision(False, [*reasons, "no gate metric could be compared: the champion stays"], checks)
    return Decision(all(checks.values()), reasons, checks)


def gate_metrics(eval_metrics: dict[str, Any]) -> dict[str, float]:
    """The gate's numbers from metrics/eval.json: perplexity, pass@1, and every lm-eval metric as lm_eval.<task>.<metric>."""
    out = {"perplexity": float(eval_metrics["perplexity"]["perplexity"])}
    if "pass_at_1" in (eval_metrics.get("humaneval") or {}):
        out["pass_at_1"] = float(eval_metrics["humaneval"]["pass_at_1"])
    for task, values in (eval_metrics.get("lm_eval") or {}).items():
        out |= {f"{LM_EVAL_PREFIX}{task}.{metric}": float(value) for metric, value in values.items()}
    return out
