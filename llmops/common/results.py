"""What every stage returns: counters (metrics), files worth logging, and a one-line human summary."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageResult:
    metrics: dict[str, Any]
    summary: str
    artifacts: list[Path] = field(default_factory=list)

    def numeric_metrics(self) -> dict[str, float]:
        """The flat numeric counters MLflow can plot; nested dicts become dotted keys."""
        out: dict[str, float] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, bool):
                out[prefix] = float(value)
            elif isinstance(value, int | float):
                out[prefix] = float(value)
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)

        walk("", self.metrics)
        # MLflow metric names allow only alphanumerics and _ - . space : /
        return {re.sub(r"[^\w\-./ ]+", "_", k).strip("_"): v for k, v in out.items()}
