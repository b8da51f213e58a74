"""Which model is the candidate downstream stages take (evaluate, quantize, register): the fine-tuned model, or the
aligned one when the align stage's gate chose it (metrics/align.json `candidate`)."""

from __future__ import annotations

import json
from pathlib import Path

from llmops.common.errors import DataError

CANDIDATES = ("aligned", "finetuned")
ALIGN_METRICS = "align.json"  # paths.metrics/align.json, as the stage table names it


def candidate_model_dir(finetune_model: Path, aligned_model: Path, metrics_dir: Path) -> Path:
    """`aligned_model` when metrics/align.json says `candidate: aligned`, else `finetune_model` (also when the align
    stage has not run)."""
    record = Path(metrics_dir) / ALIGN_METRICS
    if not record.exists():
        return Path(finetune_model)
    candidate = json.loads(record.read_text()).get("candidate")
    if candidate not in CANDIDATES:
        raise DataError(f"{record}: 'candidate' is {candidate!r}, expected one of {', '.join(CANDIDATES)}; re-run the align stage")
    return Path(aligned_model) if candidate == "aligned" else Path(finetune_model)
