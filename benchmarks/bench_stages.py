"""Throughput of the data stages: ingest -> validate -> dedup -> tokenize on the full default corpus.

Runs each stage in-process (the same `run()` that `llmops stage NAME` calls, without MLflow
tracking) into a temporary directory, on the default params (params.yaml; the corpus is the
Python stdlib source, ~1,790 .py files, ~31.5 MB), and times it with time.perf_counter.
For each stage it reports MB/s and docs/s over that stage's *input* (bytes on disk and files
for ingest; UTF-8 text bytes and records for the later stages), and, in the same run, a
"bare" baseline that does the unavoidable core of the stage and nothing else, so the ratio
ours/bare shows what the stage's extra work (checks, reports, atomic writes) costs:

  ingest    bare = Path.read_bytes() over the same files (page cache warmed for both)
  validate  bare = read the raw shards and write them back (Parquet I/O, no checks)
  dedup     bare = exact dedup only: sha256 of every text, keep first (no MinHash/LSH)
  tokenize  bare = encode_batch of every doc with the tokenizer the stage just trained
                   (no BPE training, no packing, no reference stats, no writes)

Run from the repository root:

    make bench                                   # both benchmarks
    .venv/bin/python benchmarks/bench_stages.py  # this one only
    .venv/bin/python benchmarks/bench_stages.py --repeat 3   # best of 3 per stage

Prints a markdown table and writes benchmarks/results/stages.json (gitignored).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Same offline/no-telemetry environment the CLI sets; GX would otherwise try to phone home.
os.environ.setdefault("LLMOPS_PROGRESS", "0")
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_k, _v)

sys.path.insert(0, str(ROOT))

from tasks import dedup, ingest, tokenize, validate  # noqa: E402
from llmops.common.io import read_records, write_records  # noqa: E402
from llmops.data.sources import resolve_sources  # noqa: E402
from llmops.params.load import load_params  # noqa: E402


def timed(fn, repeat: int):
    """(best seconds, last return value). Best-of-N because the machine is shared and noisy."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def text_stats(table) -> tuple[int, int]:
    """(records, UTF-8 bytes of their text): the input size of the stage that reads `table`."""
    texts = table.column("text").to_pylist()
    return len(texts), sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if t)


def row(stage: str, seconds: float, docs: int, nbytes: int, bare_name: str, bare_s: float, metrics: dict) -> dict:
    return {
        "stage": stage,
        "seconds": seconds,
        "input_docs": docs,
        "input_bytes": nbytes,
        "mb_per_s": nbytes / 1e6 / seconds,
        "docs_per_s": docs / seconds,
        "bare": bare_name,
        "bare_seconds": bare_s,
        "bare_mb_per_s": nbytes / 1e6 / bare_s if bare_s > 0 else None,
        "ratio_ours_over_bare": seconds / bare_s if bare_s > 0 else None,
        "metrics": metrics,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--repeat", type=int, default=1, help="runs per stage; the best time is reported")
    ap.add_argument("--workdir", help="keep outputs here instead of a temp dir that is deleted")
    ap.add_argument("--out", default=str(RESULTS / "stages.json"))
    args = ap.parse_args()

    params = load_params(Path(args.params))
    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-stages-") if not args.workdir else None
    work = Path(args.workdir or tmp_ctx.name).resolve()
    # Every output under `work` (Data Docs at reports/validate/data_docs); the root, where a relative ingest.source
    # is read from, stays the folder holding params.yaml.
    paths = params.paths.model_copy(
        update={name: work / name for name in ("raw", "validated", "quarantine", "reports", "dedup", "duplicates", "tokens", "tokenizer")}
    )
    rows: list[dict] = []

    # --- ingest ------------------------------------------------------------------------------
    sources = resolve_sources(params.ingest.source, params.ingest.file_glob, paths.root)
    files = [p for _, _, p in sources]
    for p in files:  # warm the page cache so neither ours nor bare pays for cold disk reads
        p.read_bytes()
    disk_bytes = sum(p.stat().st_size for p in files)
    bare_s, _ = timed(lambda: [p.read_bytes() for p in files], args.repeat)
    t, res = timed(lambda: ingest.run(params.ingest, paths), args.repeat)
    rows.append(row("ingest", t, len(files), disk_bytes, "Path.read_bytes loop", bare_s, res.metrics))

    # --- validate ----------------------------------------------------------------------------
    raw = read_records(paths.raw)
    docs, nbytes = text_stats(raw)

    def bare_validate():
        table = read_records(paths.raw)
        with tempfile.TemporaryDirectory(dir=work) as out:
            write_records(Path(out), table, shard_max_bytes=params.validate_.shard_max_bytes)

    bare_s, _ = timed(bare_validate, args.repeat)
    t, res = timed(lambda: validate.run(params.validate_, paths), args.repeat)
    rows.append(row("validate", t, docs, nbytes, "Parquet read + write, no checks", bare_s, res.metrics))

    # --- dedup -------------------------------------------------------------------------------
    validated = read_records(paths.validated)
    docs, nbytes = text_stats(validated)
    texts = validated.column("text").to_pylist()

    def bare_dedup():
        seen: set[bytes] = set()
        kept_positions = []
        for i, text in enumerate(texts):
            h = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
            if h not in seen:
                seen.add(h)
                kept_positions.append(i)
        return kept_positions

    bare_s, _ = timed(bare_dedup, args.repeat)
    t, res = timed(lambda: dedup.run(params.dedup, paths), args.repeat)
    rows.append(row("dedup", t, docs, nbytes, "exact sha256 dedup only (in memory)", bare_s, res.metrics | {"workers": params.dedup.workers}))

    # --- tokenize ----------------------------------------------------------------------------
    kept = read_records(paths.dedup)
    docs, nbytes = text_stats(kept)
    t, res = timed(lambda: tokenize.run(params.tokenize, params.model, paths), args.repeat)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(paths.tokenizer / "tokenizer.json"))
    kept_texts = kept.column("text").to_pylist()
    bare_s, _ = timed(lambda: tok.encode_batch(kept_texts, add_special_tokens=False), args.repeat)
    rows.append(row("tokenize", t, docs, nbytes, "encode_batch with the trained tokenizer", bare_s, res.metrics))

    if tmp_ctx:
        tmp_ctx.cleanup()

    total_s = sum(r["seconds"] for r in rows)
    import pyarrow
    import rensa
    import tokenizers

    report = {
        "benchmark": "bench_stages",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "repeat": args.repeat,
        "corpus": {"source": params.ingest.source or "python stdlib", "files": len(files), "bytes_on_disk": disk_bytes},
        "env": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "pyarrow": pyarrow.__version__,
            "tokenizers": tokenizers.__version__,
            "rensa": getattr(rensa, "__version__", "?"),
        },
        "total_seconds": total_s,
        "stages": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")

    print(f"\nCorpus: {report['corpus']['source']}, {len(files)} files, {disk_bytes / 1e6:.1f} MB; "
          f"{os.cpu_count()} CPUs; best of {args.repeat}\n")
    print("| stage | input docs | input MB | seconds | MB/s | docs/s | bare baseline | bare s | ours/bare |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['input_docs']:,} | {r['input_bytes'] / 1e6:.1f} | {r['seconds']:.2f} | {r['mb_per_s']:.2f} | "
              f"{r['docs_per_s']:,.0f} | {r['bare']} | {r['bare_seconds']:.3f} | {r['ratio_ours_over_bare']:.1f}x |")
    print(f"| **total** | | | {total_s:.2f} | | | | | |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
