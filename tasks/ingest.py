"""ingest: read `ingest.source` (default: the Python standard library source) into data/raw/ Parquet shards.

A record that cannot be decoded or parsed keeps its raw text and an `ingest_error`, so validate
quarantines it with the reason; files that cannot be read at all are listed in data/raw/skipped.jsonl.
"""

from __future__ import annotations

from llmops.common.results import StageResult
from llmops.data.sources import SKIPPED_FILE, ingest
from llmops.params.ingest import IngestConfig
from llmops.params.paths import PathsConfig


def run(cfg: IngestConfig, paths: PathsConfig) -> StageResult:
    metrics, summary = ingest(cfg, paths.raw, paths.root)
    return StageResult(metrics=metrics, summary=summary, artifacts=[paths.raw / SKIPPED_FILE])
