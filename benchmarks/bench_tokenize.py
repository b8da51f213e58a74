"""Tokenize's encoding against bare `tokenizers` on the same shards, the same tokenizer and the same cores.

Reads the dedup shards (`--dedup`, Parquet) and the tokenizer the stage trained (`--tokenizer`) of a finished run, e.g.
one that benchmarks/bench_scale.py kept (`--keep`); without --run/--dedup it uses the stdlib corpus's run under
--work, making it first when it is missing (bench_scale.py --corpora stdlib --keep: ingest to tokenize, ~1 minute on
2 cores). Then it times in turn, A B A B ... (`--repeat` rounds; medians and the ratio per round):

  bare        `tokenizers.Tokenizer.from_file(tokenizer.json).encode_batch(texts, add_special_tokens=False)`, and the
              ids of each encoding read out as Python lists, over every batch of texts loaded in memory beforehand:
              the library run bare, nothing read or written while timed
  bare-fast   the same with `encode_batch_fast` (no character offsets)
  llmops      `llmops.data.tokenizer.encode_shards`, the stage's whole encode pass: one map_jobs job per shard
              (load the saved tokenizer, read the shard, encode, pack with EOS, split train / validation, count
              unigrams, write part files and hash them), then the parts renamed into the token shards and
              manifest.json written (in a temporary directory); Parquet reads, worker start-up and the writes are
              inside its time
  llmops-1    the same with workers=1 (one process, tokenizers' threads on every core), when `--workers` (the
              stage's tokenize.workers, default 0 = its own choice) picks more than one

bare and bare-fast use tokenizers' own Rust threads (TOKENIZERS_PARALLELISM=true, RAYON_NUM_THREADS unset: every
core); llmops runs as many processes as the stage does (llmops.data.tokenizer.encode_workers) on the same cores.
The issue's goal is llmops >= 0.9 x bare in tokens/s.

    .venv/bin/python benchmarks/bench_tokenize.py                     # the stdlib corpus, made under /tmp/llmops-scale
    .venv/bin/python benchmarks/bench_scale.py --corpora 100mb --keep   # leaves /tmp/llmops-scale/runs/100mb/processes
    .venv/bin/python benchmarks/bench_tokenize.py --run /tmp/llmops-scale/runs/100mb/processes
"""

from __future__ import annotations

import _setup  # noqa: F401  (repository on sys.path, offline environment)

import argparse
import os
import statistics
import subprocess
import sys
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


def ours(tokenizer_dir: Path, shards: list[Path], batch_docs: int, is_val: np.ndarray, workers: int) -> tuple[float, int, str]:
    from llmops.data.tokenizer import encode_shards

    with tempfile.TemporaryDirectory() as tmp:
        encoded = encode_shards(tokenizer_dir, shards, is_val, batch_docs, Path(tmp), workers)
    return encoded.seconds, encoded.tokens[False] + encoded.tokens[True] - len(is_val), encoded.ran_on  # minus the EOS ids it adds


def stdlib_run(work: Path) -> Path:
    """The stdlib corpus's kept bench_scale run under `work`, made when missing."""
    run = work / "runs" / "stdlib" / "processes"
    if not (run / "tokenizer" / "tokenizer.json").exists():
        scale = Path(__file__).with_name("bench_scale.py")
        cmd = [sys.executable, str(scale), "--corpora", "stdlib", "--keep", "--work", str(work), "--out", str(work / "scale.json")]
        print("making the stdlib corpus's run:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a kept bench_scale run dir holding dedup/ and tokenizer/")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmops-scale"), help="where the stdlib run is kept or made")
    ap.add_argument("--dedup", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--batch-docs", type=int, default=256, help="tokenize.batch_docs")
    ap.add_argument("--workers", type=int, default=0, help="tokenize.workers")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from llmops.common.io import record_shards
    from llmops.data.tokenizer import encode_workers, shard_text_bytes

    run = args.run or (None if args.dedup and args.tokenizer else stdlib_run(args.work))
    dedup = args.dedup or run / "dedup"
    tokenizer = args.tokenizer or run / "tokenizer"
    shards = record_shards(dedup)
    batches = load_batches(dedup, args.batch_docs)
    n = sum(map(len, batches))
    is_val = np.random.default_rng(0).random(n) < args.val_fraction
    mb = sum(len(t.encode()) for b in batches for t in b) / 1e6
    print(f"{n:,} docs, {mb:.1f} MB in {len(shards)} shard(s), {len(batches)} batches of {args.batch_docs}; {os.cpu_count()} cores", flush=True)
    from transformers import AutoTokenizer  # noqa: F401  (imported already in the stage's process: it trained the BPE)

    encoders = {
        "bare": lambda: bare(tokenizer / "tokenizer.json", batches, fast=False),
        "bare-fast": lambda: bare(tokenizer / "tokenizer.json", batches, fast=True),
        "llmops": lambda: ours(tokenizer, shards, args.batch_docs, is_val, args.workers),
    }
    if encode_workers(args.workers, shard_text_bytes(shards)) != 1:
        encoders["llmops-1"] = lambda: ours(tokenizer, shards, args.batch_docs, is_val, 1)
    times: dict[str, list[float]] = {name: [] for name in encoders}
    counts, ran_on = {}, "?"
    for round_ in range(args.repeat):
        for name, fn in encoders.items():
            result = fn()
            times[name].append(result[0])
            counts[name] = result[1]
            if name == "llmops":
                ran_on = result[2]
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items())
              + f"; llmops speed / bare {times['bare'][-1] / times['llmops'][-1]:.2f}, / bare-fast {times['bare-fast'][-1] / times['llmops'][-1]:.2f}", flush=True)
    if len(set(counts.values())) != 1:
        raise SystemExit(f"token counts differ: {counts}")
    print(f"llmops ran on {ran_on}")
    print("\n| encoder | median s | MB/s | tokens/s | speed vs bare |\n|---|---|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {mb / med:.2f} | {counts[name] / med:,.0f} | "
              f"{statistics.median(b / t for b, t in zip(times['bare'], values, strict=True)):.2f} |")


if __name__ == "__main__":
    main()
