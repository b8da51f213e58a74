"""params.yaml `tokenize`: the BPE tokenizer, the train/val split and the drift reference statistics."""

from __future__ import annotations

from pydantic import Field

from llmops.params.base import Section


class TokenizeConfig(Section):
    vocab_size: int = Field(8192, ge=260)
    min_frequency: int = Field(2, ge=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    split_seed: int = 0
    batch_docs: int = Field(256, ge=1)
    # The BPE learns from at most this many bytes of train documents, picked by a hash of their id (0 = all of them).
    train_sample_bytes: int = Field(200_000_000, ge=0)
    length_histogram_bins: int = Field(32, ge=4)
