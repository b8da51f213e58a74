"""Datasets the Trainer reads: fixed-length blocks of the token shards (pretrain) and tokenized
instruction pairs with the loss on the response only (finetune)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmops.common.errors import DataError
from llmops.data.token_shards import TokenShards

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding)


def load_token_meta(tokens_dir: Path) -> dict[str, Any]:
    meta_file = Path(tokens_dir) / "meta.json"
    if not meta_file.exists():
        raise DataError(f"{meta_file}: not found; run the tokenize stage first (`dvc repro tokenize`).")
    return json.loads(meta_file.read_text())


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping `seq_len` blocks of a flat token array (a split's TokenShards, or an in-memory array), in a
    fixed order shuffled once by `seed`. Blocks run across shard boundaries as if the shards were one file.

    The order lives in the dataset, not in a sampler, so the Trainer reads it sequentially: a resumed
    run skips exactly the blocks already seen, and N processes together read the same blocks per
    step as one process with N times the batch.
    """

    def __init__(self, tokens: TokenShards | np.ndarray, seq_len: int, *, seed: int | None, limit_tokens: int = 0) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        n_blocks = len(self.tokens) // seq_len
        if limit_tokens:
            n_blocks = min(n_blocks, max(1, limit_tokens // seq_len))
        if n_blocks == 0:
            name = tokens if isinstance(tokens, TokenShards) else "the token array"
            raise DataError(f"{name}: {len(self.tokens)} tokens is less than one block of seq_len={seq_len}; lower seq_len or add data.")
        order = np.arange(n_blocks)
        if seed is not None:
            order = np.random.default_rng(seed).permutation(n_blocks)
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self.order[i]) * self.seq_len
        ids = torch.from_numpy(self.tokens[start : start + self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


class PairDataset(torch.utils.data.Dataset):
    """Tokenized instruction pairs: labels are IGNORE_INDEX over the prompt, so only the response is learned."""

    def __init__(self, examples: list[dict[str, list[int]]], *, seed: int | None) -> None:
        order = np.arange(len(examples))
        if seed is not None:
            order = np.random.default_rng(seed).permutation(len(examples))
        self.examples = [examples[i] for i in order]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]


def pair_collator(tokenizer: Any, *, packing: bool) -> Any:
    """Packing: pairs of a batch are concatenated into one row with position ids restarting per pair, which
    transformers turns into a block-diagonal attention mask (no padding, no cross-pair attention).
    Otherwise each batch is padded to its longest pair (labels padded with IGNORE_INDEX)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8, return_tensors="pt")
