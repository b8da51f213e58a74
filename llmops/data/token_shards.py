"""The token shards of data/tokens and their manifest: the file layout tokenize writes and the one reader every
consumer (pretrain, evaluate, quantize, lm-eval's held-out task, the benchmarks) reads them through.

Layout: each split is a list of shard files, `train-00000.bin`, `train-00001.bin`, ... and `val-00000.bin`, ...,
flat token ids of the manifest's dtype with EOS after every document. A shard never splits a document and is never
empty; a split with no documents has no shards. manifest.json holds

    {"dtype": "uint16", "splits": {"train": [{"file": "train-00000.bin", "tokens": 1234, "docs": 5, "sha256": "..."}, ...],
                                   "val": [...]}}

and a split's token array is its shards concatenated in manifest order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmops.common.errors import DataError

MANIFEST = "manifest.json"
SPLITS = ("train", "val")  # indexed by "is held out": SPLITS[False] is the train split


def shard_file_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def load_manifest(tokens_dir: Path) -> dict[str, Any]:
    manifest_file = Path(tokens_dir) / MANIFEST
    if not manifest_file.is_file():
        raise DataError(f"{manifest_file}: not found; run the tokenize stage first (`dvc repro tokenize`).")
    return json.loads(manifest_file.read_text())


class TokenShards:
    """One split of a tokens directory as one flat token array: each shard memory-mapped, `len()` in tokens, and
    `[start:stop]` a numpy array of the tokens in that range of the concatenated shards (a view of the shard's map
    when the range lies in one shard, a copy when it crosses a boundary).

    Opening checks that every shard the manifest lists is there with the size its token count gives, so a missing
    or truncated file fails here with its name, not as wrong tokens later."""

    def __init__(self, tokens_dir: Path, split: str) -> None:
        tokens_dir = Path(tokens_dir)
        manifest = load_manifest(tokens_dir)
        if split not in manifest["splits"]:
            raise DataError(f"{tokens_dir / MANIFEST}: no split {split!r} (it has {sorted(manifest['splits'])}); re-run the tokenize stage.")
        self.name = f"{tokens_dir} ({split} split)"
        self.dtype = np.dtype(manifest["dtype"])
        self.shards: list[np.memmap] = []
        sizes = []
        for entry in manifest["splits"][split]:
            path = tokens_dir / entry["file"]
            expected = int(entry["tokens"]) * self.dtype.itemsize
            if not path.is_file():
                raise DataError(
                    f"{path}: listed in {tokens_dir / MANIFEST} but missing; the token shards are incomplete. "
                    "Re-run the tokenize stage (`dvc repro tokenize`)."
                )
            if path.stat().st_size != expected:
                raise DataError(
                    f"{path}: {path.stat().st_size} bytes, but {tokens_dir / MANIFEST} lists {entry['tokens']} tokens of "
                    f"{self.dtype} ({expected} bytes); the shard is truncated or was replaced. Re-run the tokenize stage (`dvc repro tokenize`)."
                )
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
            sizes.append(int(entry["tokens"]))
        self.offsets = np.cumsum([0, *sizes], dtype=np.int64)  # shard k holds tokens offsets[k] .. offsets[k + 1] - 1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __str__(self) -> str:
        return self.name

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError(f"{self.name}: index with a slice ([start:stop]), not {type(key).__name__}")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError(f"{self.name}: slices with a step are not supported")
        if start >= stop:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left")) - 1  # the shard holding token stop - 1
        pieces = [
            self.shards[k][max(start, int(self.offsets[k])) - int(self.offsets[k]) : min(stop, int(self.offsets[k + 1])) - int(self.offsets[k])]
            for k in range(first, last + 1)
        ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
