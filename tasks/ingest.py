"""ingest: read `ingest.source` (default: the Python standard library source) into data/raw/ Parquet shards.

The sources are cut into splits of about `ingest.split_bytes` (JSONL byte ranges, Parquet row-group runs, groups of
small files), read at once by `ingest.workers` local processes or on Ray (llmops.data.engine); the shards are numbered
in split order, so data/raw/ is the same whatever the engine or the number of workers.

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
