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
    # shards encoded at once, by local processes of one tokenizers thread each; 1 = one process whose tokenizers threads
    # use every core; 0 = one process per CPU core when the shards keep them busy, else 1 (llmops.data.tokenizer.encode_workers)
    workers: int = Field(0, ge=0)
