"""params.yaml `ingest`: what the ingest stage reads and how it shards it."""

from __future__ import annotations

from pydantic import Field

from llmops.params.base import Section


class IngestConfig(Section):
    source: str | list[str] = ""  # path, glob, .jsonl, .parquet, HF dataset dir; "" = Python stdlib source
    text_field: str = "text"  # column/key that holds the text in JSONL, Parquet and HF datasets
    id_field: str = "id"  # column/key with a stable id; absent = derived from source path + row
    file_glob: str = "**/*.py"  # files taken when `source` is a directory
    max_file_bytes: int = Field(50_000_000, gt=0)  # a text/code file (one record) larger than this is skipped and listed; JSONL/Parquet/HF stream at any size
    shard_max_bytes: int = Field(16_000_000, gt=0)
    # Bytes of source one job reads: a JSONL file is cut into byte ranges of this size, a Parquet file into runs of row
    # groups of about this size, consecutive small files are grouped up to it. The plan depends on this and the sources
    # only, so the shards (cut at split ends too) are the same for any `workers`; a change here re-cuts them.
    split_bytes: int = Field(64_000_000, gt=0)
    workers: int = Field(0, ge=0)  # splits read at once (local processes, or Ray tasks); 0 = one per CPU core
