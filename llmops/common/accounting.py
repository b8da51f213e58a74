"""Record accounting across the data stages: every ingested record is kept, quarantined, or a named duplicate."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from llmops.common.errors import StageError
from llmops.common.stages import DATA_STAGES, metrics_file

if TYPE_CHECKING:
    from llmops.params.paths import PathsConfig


def check_accounting(metrics: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Check in = kept + quarantined + duplicates, and that each stage read what the previous one wrote.

    `metrics` maps stage name -> its metrics/<stage>.json; stages not present are not checked.
    """
    ingest, validate, dedup, tokenize = (metrics.get(s) for s in DATA_STAGES)
    problems = []
    if ingest and validate and validate["docs_in"] != ingest["docs"]:
        problems.append(f"validate read {validate['docs_in']} records but ingest wrote {ingest['docs']}")
    if validate and dedup and dedup["docs_in"] != validate["docs_out"]:
        problems.append(f"dedup read {dedup['docs_in']} records but validate kept {validate['docs_out']}")
    if dedup and tokenize and tokenize["train_docs"] + tokenize["val_docs"] != dedup["docs_out"]:
        problems.append(f"tokenize packed {tokenize['train_docs'] + tokenize['val_docs']} documents but dedup kept {dedup['docs_out']}")
    summary: dict[str, int] = {}
    if ingest and validate and dedup:
        summary = {
            "records_in": ingest["docs"],
            "kept": dedup["docs_out"],
            "quarantined": validate["quarantined"],
            "duplicates": dedup["exact_duplicates"] + dedup["near_duplicates"],
        }
        if summary["records_in"] != summary["kept"] + summary["quarantined"] + summary["duplicates"]:
            problems.append(
                f"records in ({summary['records_in']}) != kept ({summary['kept']}) + quarantined "
                f"({summary['quarantined']}) + duplicates ({summary['duplicates']})"
            )
    if problems:
        raise StageError("record accounting does not add up: " + "; ".join(problems) + ". Re-run with `dvc repro --force`.")
    return summary


def read_stage_metrics(paths: PathsConfig, stages: tuple[str, ...] = DATA_STAGES) -> dict[str, dict[str, Any]]:
    """Each stage's metrics file (the stage table names it) that exists: stage -> its metrics."""
    out = {}
    for stage in stages:
        path = metrics_file(stage, paths)
        if path.exists():
            out[stage] = json.loads(path.read_text())
    return out
