"""params.yaml `dedup`: exact and MinHash-LSH near-duplicate removal."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmops.params.base import Section


class DedupConfig(Section):
    engine: Literal["rensa", "datasketch"] = "rensa"
    threshold: float = Field(0.7, gt=0, le=1)  # Jaccard similarity above which two docs are near-duplicates
    shingle_words: int = Field(5, ge=1)
    num_perm: int = Field(128, ge=16)
    seed: int = 1
    workers: int = Field(0, ge=0)  # 0 = one per CPU core
    shard_max_bytes: int = Field(16_000_000, gt=0)
