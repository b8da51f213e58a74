"""What every stage returns: counters (metrics), files worth logging, and a one-line human summary."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    """`metrics` is the stage's whole record (its metrics file). `facts` names the dotted keys of it that are
    configuration or fixed properties of what was built (parameter counts, vocabulary size, LSH bands, thresholds,
    steps): MLflow gets those as run params, not metrics, so the charts hold only measurements."""

    metrics: dict[str, Any]
    summary: str
    artifacts: list[Path] = field(default_factory=list)
    facts: tuple[str, ...] = ()

    def _is_fact(self, key: str) -> bool:
        return any(key == fact or key.startswith(fact + ".") for fact in self.facts)

    def fact_params(self) -> dict[str, Any]:
        """The facts as flat `key -> value` run params (a fact may name a whole nested block)."""
        return {key: value for key, value in _flat(self.metrics).items() if self._is_fact(key)}

    def numeric_metrics(self) -> dict[str, float]:
        """The flat numeric counters MLflow can plot; nested dicts become dotted keys."""
        out = {k: float(v) for k, v in _flat(self.metrics).items() if isinstance(v, int | float) and not self._is_fact(k)}
        # MLflow metric names allow only alphanumerics and _ - . space : /
        return {re.sub(r"[^\w\-./ ]+", "_", k).strip("_"): v for k, v in out.items()}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; other values (numbers, booleans, strings, lists) as they are."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
