"""What every stage returns: counters (metrics), files worth logging, and a one-line human summary."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


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


def progress(items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """A tqdm bar on stderr; LLMOPS_PROGRESS=0 turns bars off (tests, log files)."""
    from tqdm.auto import tqdm

    disable = os.environ.get("LLMOPS_PROGRESS", "1") == "0"
    return iter(tqdm(items, desc=desc, unit=unit, total=total, disable=disable, file=sys.stderr, dynamic_ncols=True))
