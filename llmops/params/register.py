"""params.yaml `register`: the registered model name and the champion/challenger gate."""

from __future__ import annotations

from pydantic import Field

from llmops.params.base import Section


class GateConfig(Section):
    """When a challenger replaces the champion; both are scored on the same eval data (llmops.eval_data)."""

    min_pass_at_1_delta: float = Field(0.0, ge=-1, le=1)  # challenger pass@1 >= champion pass@1 + this
    max_perplexity_increase: float = Field(0.05, ge=0)  # challenger perplexity <= champion perplexity * (1 + this)
    # challenger HumanEval solution NLL (bits/token) <= champion's * (1 + this); 20 problems' solutions are ~2k tokens
    # of out-of-domain code, a noisier estimate than held-out perplexity, so the bound is relative like perplexity's
    max_humaneval_nll_increase: float = Field(0.05, ge=0)
    # challenger held-out doctest pass rate >= champion's + this (0 = no worse; a handful of prompts moves it in steps)
    min_doctest_pass_rate_delta: float = Field(0.0, ge=-1, le=1)
    reevaluate_champion: bool = True  # champion scored on other eval data: re-score it on the current data before comparing
    # lm-eval metric "<task>.<metric>" (metrics/eval.json lm_eval) -> the least improvement over the champion it needs:
    # higher for scores, lower for perplexity / bits_per_byte / loss; 0 = no worse, negative = may regress that much
    lm_eval: dict[str, float] = Field(default_factory=dict)


class RegisterConfig(Section):
    """The MLflow registered model the register stage adds a version to, and the champion/challenger gate."""

    model_name: str = Field("llmops-code", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    register_quantized: bool = True  # also register each paths.quantized/<scheme>/ as a version of <model_name>-<scheme>
    log_transformers_flavor: bool = True  # log the MLflow transformers flavor (mlflow.transformers.load_model works)
    emit_events: bool = True  # Prefect event llmops.champion.changed when the champion changes (best effort)
    gate: GateConfig = GateConfig()
