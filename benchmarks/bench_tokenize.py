"""Tokenize's encoding against bare `tokenizers` on the same shards, the same tokenizer and the same cores.

Reads the dedup shards (`--dedup`, Parquet) and the tokenizer the stage trained (`--tokenizer`) of a finished run, e.g.
one that benchmarks/bench_scale.py kept (`--keep`), loads every batch of texts into memory once (so both sides time
encoding, not Parquet reads), then times in turn, A B A B ... (`--repeat` rounds; medians and the ratio per round):

  bare        `tokenizers.Tokenizer.from_file(tokenizer.json).encode_batch(texts, add_special_tokens=False)`, and the
              ids of each encoding read out as Python lists: the library run bare, nothing written
  bare-fast   the same with `encode_batch_fast` (no character offsets)
  llmops      `llmops.data.tokenizer.encode_stream`, the stage's own loop: encode, pack with EOS, split train /
              validation, count unigrams, write both token files (to a temporary directory)

All three use tokenizers' own Rust threads (TOKENIZERS_PARALLELISM=true, RAYON_NUM_THREADS unset: every core).
The issue's goal is llmops >= 0.9 x bare in tokens/s.

    .venv/bin/python benchmarks/bench_scale.py --corpora 100mb --keep   # leaves /tmp/llmops-scale/runs/100mb/processes
    .venv/bin/python benchmarks/bench_tokenize.py --run /tmp/llmops-scale/runs/100mb/processes
"""

from __future__ import annotations

import _setup  # noqa: F401  (repository on sys.path, offline environment)

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def load_batches(dedup: Path, batch_docs: int) -> list[list[str]]:
    from llmops.common.io import record_shards

    return [
        batch.column("text").to_pylist()
        for shard in record_shards(dedup)
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_docs, columns=["text"])
    ]


def bare(tokenizer_json: Path, batches: list[list[str]], fast: bool) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.encode_special_tokens = True
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    started, tokens = time.perf_counter(), 0
    for texts in batches:
        tokens += sum(len(enc.ids) for enc in encode(texts, add_special_tokens=False))
    return time.perf_counter() - started, tokens


def ours(tokenizer_dir: Path, batches: list[list[str]], val_fraction: float) -> tuple[float, int]:
    from transformers import PreTrainedTokenizerFast

    from llmops.data.tokenizer import encode_stream

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    n = sum(map(len, batches))
    is_val = np.random.default_rng(0).random(n) < val_fraction
    starts = np.cumsum([0, *map(len, batches)])[:-1]
    with tempfile.TemporaryDirectory() as tmp, open(f"{tmp}/train.bin", "wb") as train, open(f"{tmp}/val.bin", "wb") as val:
        encoded = encode_stream(tok, zip(starts.tolist(), batches, strict=True), is_val, {False: train, True: val})
    return encoded.seconds, encoded.tokens[False] + encoded.tokens[True] - n  # minus the EOS ids it adds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a kept bench_scale run dir holding dedup/ and tokenizer/")
    ap.add_argument("--dedup", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--batch-docs", type=int, default=256, help="tokenize.batch_docs")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dedup = args.dedup or args.run / "dedup"
    tokenizer = args.tokenizer or args.run / "tokenizer"
    batches = load_batches(dedup, args.batch_docs)
    mb = sum(len(t.encode()) for b in batches for t in b) / 1e6
    print(f"{sum(map(len, batches)):,} docs, {mb:.1f} MB in {len(batches)} batches of {args.batch_docs}", flush=True)
    times: dict[str, list[float]] = {"bare": [], "bare-fast": [], "llmops": []}
    counts = {}
    for round_ in range(args.repeat):
        for name, fn in (
            ("bare", lambda: bare(tokenizer / "tokenizer.json", batches, fast=False)),
            ("bare-fast", lambda: bare(tokenizer / "tokenizer.json", batches, fast=True)),
            ("llmops", lambda: ours(tokenizer, batches, args.val_fraction)),
        ):
            seconds, counts[name] = fn()
            times[name].append(seconds)
        ratios = {name: times["bare"][-1] / times[name][-1] for name in times}
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
              + f"; llmops speed / bare {ratios['llmops']:.2f}, / bare-fast {times['bare-fast'][-1] / times['llmops'][-1]:.2f}", flush=True)
    if len(set(counts.values())) != 1:
        raise SystemExit(f"token counts differ: {counts}")
    print("\n| encoder | median s | MB/s | tokens/s | speed vs bare |\n|---|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {mb / med:.2f} | {counts[name] / med:,.0f} | "
              f"{statistics.median(b / t for b, t in zip(times['bare'], values, strict=True)):.2f} |")


if __name__ == "__main__":
    main()
