"""The headline of a pipeline run: the few numbers that tell pipeline runs apart, read from the stages' metrics files
and logged on the parent MLflow run, so the run table ranks pipelines without opening nine child runs.

One name for one quantity: `quality.*` (how good the candidate is), `data.*` (what the corpus became), `cost.*`
(what it took). Stages that did not write their metrics (a slice of the DAG) leave their headline keys out.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llmops.common.stages import metrics_file

if TYPE_CHECKING:
    from llmops.params.paths import PathsConfig

# headline key -> (stage, dotted key in that stage's metrics file)
HEADLINE: dict[str, tuple[str, str]] = {
    "quality.pass_at_1": ("evaluate", "humaneval.pass_at_1"),
    "quality.perplexity": ("evaluate", "perplexity.perplexity"),
    "quality.base_perplexity": ("evaluate", "base_perplexity.perplexity"),
    "quality.instructions_fuzzy_match": ("evaluate", "instructions.fuzzy_match"),
    # scores that move while pass@1 is 0: HumanEval canonical-solution NLL (the base's is in eval.json), held-out doctest pass rate
    "quality.humaneval_bits_per_token": ("evaluate", "humaneval.nll_bits_per_token"),
    "quality.doctest_pass_rate": ("evaluate", "doctest.pass_rate"),
    "quality.pretrain_eval_loss": ("pretrain", "eval_loss"),
    "quality.finetune_eval_loss": ("finetune", "eval_loss"),
    "data.records_in": ("ingest", "docs"),
    "data.quarantined": ("validate", "quarantined"),
    "data.kept": ("dedup", "docs_out"),
    "data.train_tokens": ("tokenize", "train_tokens"),
    "cost.pretrain_tokens": ("pretrain", "tokens"),
    "cost.pretrain_seconds": ("pretrain", "train_seconds"),
    "cost.finetune_tokens": ("finetune", "tokens"),
    "cost.finetune_seconds": ("finetune", "train_seconds"),
}


def _dig(metrics: dict[str, Any], dotted: str) -> Any:
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def headline_metrics(paths: PathsConfig) -> dict[str, float]:
    """The headline keys whose stage metrics file exists and holds a number (booleans are not numbers here)."""
    files: dict[str, dict[str, Any]] = {}
    for stage in {stage for stage, _ in HEADLINE.values()}:
        path = metrics_file(stage, paths)
        if path.exists():
            files[stage] = json.loads(path.read_text())
    out = {}
    for key, (stage, dotted) in HEADLINE.items():
        value = _dig(files.get(stage, {}), dotted)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    if "data.records_in" in out and "data.kept" in out and "data.quarantined" in out:
        out["data.duplicates"] = out["data.records_in"] - out["data.kept"] - out["data.quarantined"]
    return out


def run_name(flow_run_name: str, overrides: list[str], limit: int = 120) -> str:
    """`pipeline <flow-run name>` plus the overrides, so two runs of the table are told apart at a glance."""
    name = f"pipeline {flow_run_name}".strip()
    if overrides:
        name += " " + " ".join(overrides)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def fmt(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) and abs(value) >= 1 else f"{value:.4g}"


def description(stages: dict[str, dict[str, Any]], headline: dict[str, float], overrides: list[str]) -> str:
    """The run's description (MLflow shows `mlflow.note.content` as Markdown on the run page)."""
    ran = [s for s, r in stages.items() if not r.get("cached")]
    cached = [s for s, r in stages.items() if r.get("cached")]
    lines = [f"**Stages run:** {', '.join(ran) or 'none'}; **up to date:** {', '.join(cached) or 'none'}."]
    if overrides:
        lines.append(f"**Overrides** (written into params.yaml): `{'`, `'.join(overrides)}`.")
    if headline:
        lines += ["", "| metric | value |", "|---|---|", *(f"| {k} | {fmt(v)} |" for k, v in headline.items())]
    return "\n".join(lines)


def nested(headline: dict[str, float]) -> dict[str, dict[str, float | int]]:
    """`quality.pass_at_1` -> {"quality": {"pass_at_1": ...}}: metrics/summary.json, which DVC shows as the same dotted
    keys. Counts (records, tokens) are written as integers."""
    out: dict[str, dict[str, float | int]] = {}
    for key, value in headline.items():
        group, _, name = key.partition(".")
        counted = group == "data" or name.endswith("_tokens")
        out.setdefault(group, {})[name] = int(value) if counted and float(value).is_integer() else value
    return out
