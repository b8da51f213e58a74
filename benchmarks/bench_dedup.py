"""Near-dedup side by side: our dedup stage (rensa / datasketch engines) vs text-dedup and datatrove.

Every engine gets the SAME input: the validated records of the default corpus (Python stdlib
source; produced here by running ingest + validate into a temp dir, or `--input DIR` of
Parquet shards in our record schema), with threshold 0.7, word 5-gram shingles, 128
permutations, and the same LSH banding (16 bands x 8 rows: what llmops.data.minhash.lsh_bands picks).
For each engine it reports wall time, MB/s over the input text, docs removed, and agreement
with ours (rensa, workers=0): |A∩B|, only-in-ours, only-in-other over the removed-doc sets.

Then it plants near duplicates: 50 documents (>= 100 words, fixed seed) are copied with 3% of
their words replaced at random, appended to the corpus, and each engine runs again. Recall =
share of planted pairs where the copy (or its original) is removed; precision = share of the
run's new removals (vs the unplanted run) that are planted copies or their originals. The planted
pairs' true Jaccard sits near the threshold, so one seed's recall is a draw: `--seeds N` also
reports the share of pairs whose signatures estimate a Jaccard at or above it over N MinHash
seeds, with our shingle hashes and with rensa's hashing of string shingles (seed_sweep).

Engines:
  ours rensa w0 / w1, ours datasketch w0  tasks.dedup.run in a fresh process of this script, as a stage runs
                                           (Parquet read + write included)
  rensa bare                               rensa's RMinHash + RMinHashLSH in one process, as its README uses them:
                                           query, a candidate at estimated Jaccard >= threshold is a duplicate,
                                           else insert (Parquet read included, no output written), in a
                                           fresh process too
  text-dedup 0.4.1 (verify / default)      subprocess in its own Python 3.12 venv (needs >= 3.12)
  datatrove 0.10.1                          subprocess in its own Python 3.12 venv
Peer times are the peers' own pipeline (load, hash, cluster, save), measured inside the
subprocess; interpreter start-up and imports are reported separately as `process_s`.
Differences in peer settings are listed in the output (`notes`).

Setup of the peer venvs (once; the project venv is Python 3.11, text-dedup 0.4.1 needs 3.12):

    /root/.pyenv/versions/3.12.1/bin/python3.12 -m venv /tmp/peervenv
    /tmp/peervenv/bin/pip install text-dedup==0.4.1
    /root/.pyenv/versions/3.12.1/bin/python3.12 -m venv /tmp/dtvenv
    /tmp/dtvenv/bin/pip install 'datatrove==0.10.*' pyarrow orjson regex tokenizers 'xxhash<4'

Run from the repository root:

    .venv/bin/python benchmarks/bench_dedup.py
    .venv/bin/python benchmarks/bench_dedup.py --input data/validated --textdedup-python /tmp/peervenv/bin/python
    .venv/bin/python benchmarks/bench_dedup.py --input DIR --repeat 3 --seeds 40   # median of 3 rounds; 40-seed sweep

A peer whose interpreter is missing is reported as skipped. Prints a markdown table and writes
benchmarks/results/dedup.json (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _setup import RESULTS, ROOT  # noqa: E402  (repo on sys.path, offline environment, no progress bars)

PEERS = ROOT / "benchmarks" / "peers"

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tasks import dedup, ingest, validate  # noqa: E402
from llmops.common.io import read_records, write_records  # noqa: E402
from llmops.data import minhash  # noqa: E402
from llmops.params.load import load_params  # noqa: E402
from llmops.params.paths import PathsConfig  # noqa: E402

PLANTED_DOCS = 50
PLANTED_FRACTION = 0.03
PLANTED_MIN_WORDS = 100  # so 3% is at least 3 changed words
PLANT_SEED = 1234


def prepare_input(args, work: Path) -> pa.Table:
    """The validated records: from --input, or ingest + validate of the default corpus into `work`."""
    if args.input:
        return read_records(Path(args.input))
    params = load_params(Path(args.params))
    # The stages' outputs go under `work`; the root (where a relative ingest.source is read from) stays params.yaml's folder.
    paths = params.paths.model_copy(update={name: work / name for name in ("raw", "validated", "quarantine", "reports")})
    ingest.run(params.ingest, paths)
    validate.run(params.validate_, paths)
    return read_records(paths.validated)


def plant(table: pa.Table) -> tuple[pa.Table, list[int]]:
    """Append PLANTED_DOCS perturbed copies; returns the new table and each copy's original position."""
    rng = random.Random(PLANT_SEED)
    texts = table.column("text").to_pylist()
    eligible = [i for i, t in enumerate(texts) if len(t.split()) >= PLANTED_MIN_WORDS]
    originals = sorted(rng.sample(eligible, PLANTED_DOCS))
    vocabulary = sorted({w for i in rng.sample(range(len(texts)), 200) for w in texts[i].split()})
    copies = []
    for pos in originals:
        # Split keeping the whitespace so the copy still looks like the original file.
        parts = re.split(r"(\s+)", texts[pos])
        word_slots = [k for k, p in enumerate(parts) if p and not p.isspace()]
        for k in rng.sample(word_slots, max(1, round(len(word_slots) * PLANTED_FRACTION))):
            parts[k] = rng.choice(vocabulary)
        copies.append("".join(parts))
    extra = pa.table(
        {
            "id": [f"planted/{k}" for k in range(len(copies))],
            "text": copies,
            "source": ["planted"] * len(copies),
            "meta": [json.dumps({"copy_of": table.column("id")[p].as_py()}) for p in originals],
            "ingest_error": pa.nulls(len(copies), pa.string()),
        },
        schema=table.schema,
    )
    return pa.concat_tables([table, extra]), originals


def word_shingles(text: str, n: int) -> list[str]:
    """Distinct word n-grams as strings (str.split's words); a document shorter than n words is one shingle. The
    shingles of rensa's bare run and of the true Jaccard of planted pairs."""
    words = text.split()
    if len(words) < n:
        return [" ".join(words)] if words else []
    return list({" ".join(words[i : i + n]) for i in range(len(words) - n + 1)})


def true_jaccard(a: str, b: str, n: int) -> float:
    sa, sb = set(word_shingles(a, n)), set(word_shingles(b, n))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def seed_sweep(originals: list[str], copies: list[str], cfg, seeds: int) -> dict:
    """How often each planted pair's signatures estimate a Jaccard at or above the threshold, over `seeds` MinHash
    seeds: with our shingles (hashed in numpy, minhash.digest_matrix) and with rensa's own hashing of Python string
    shingles (RMinHash.from_token_sets, as the bare run). One seed's recall is a draw from this distribution (the
    pairs' true Jaccard sits near the threshold), so this, not one seed, shows whether a shingling change moved it."""
    import numpy as np
    from rensa import RMinHash

    def strings(texts: list[str], seed: int) -> np.ndarray:
        sets = [word_shingles(t, cfg.shingle_words) for t in texts]
        return np.array([m.digest() for m in RMinHash.from_token_sets(sets, num_perm=cfg.num_perm, seed=seed)], dtype=np.uint32)

    def ours(texts: list[str], seed: int) -> np.ndarray:
        return minhash.digest_matrix("rensa", texts, cfg.shingle_words, cfg.num_perm, seed)

    out = {}
    for name, sign in (("hashed shingles (ours)", ours), ("string shingles (rensa's hashing)", strings)):
        rates = np.array([((sign(originals, s) == sign(copies, s)).mean(axis=1) >= cfg.threshold).mean() for s in range(1, seeds + 1)])
        out[name] = {"mean": float(rates.mean()), "sd": float(rates.std()), "min": float(rates.min()), "max": float(rates.max())}
    return out


def export_for_peers(table: pa.Table, out: Path, shards: int) -> Path:
    """id = row position (so every engine's answer maps back to the same rows), text; split in `shards`
    files because datatrove parallelises by input file."""
    out.mkdir(parents=True, exist_ok=True)
    n = table.num_rows
    export = pa.table({"id": [str(i) for i in range(n)], "text": table.column("text")})
    step = -(-n // shards)
    for s in range(shards):
        pq.write_table(export.slice(s * step, step), out / f"part-{s:05d}.parquet")
    return out


def run_ours(cfg, records_dir: Path, work: Path) -> dict:
    paths = PathsConfig(validated=records_dir, dedup=work / "dedup", duplicates=work / "duplicates").under(work)
    start = time.perf_counter()
    result = dedup.run(cfg, paths)
    seconds = time.perf_counter() - start
    removed = read_records(paths.duplicates).column("id").to_pylist()
    return {"seconds": seconds, "removed_ids": removed, "exact": result.metrics["exact_duplicates"], "near": result.metrics["near_duplicates"]}


def run_rensa_bare(cfg, records_dir: Path) -> dict:
    """rensa alone, as its README uses it, in one process: read the shards, an RMinHash of each document's word
    shingles, then in order: query RMinHashLSH, a document with a candidate at estimated Jaccard >= threshold is a
    duplicate, else it is inserted. No exact-dedup pass, no Parquet output."""
    from rensa import RMinHash, RMinHashLSH

    start = time.perf_counter()
    table = read_records(records_dir)
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    hashes = RMinHash.from_token_sets([word_shingles(t, cfg.shingle_words) for t in texts], num_perm=cfg.num_perm, seed=cfg.seed)
    lsh = RMinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, num_bands=minhash.lsh_bands(cfg.threshold, cfg.num_perm))
    removed = []
    for key, m in enumerate(hashes):
        if any(m.jaccard(hashes[other]) >= cfg.threshold for other in lsh.query(m)):
            removed.append(ids[key])
        else:
            lsh.insert(key, m)
    return {"seconds": time.perf_counter() - start, "removed_ids": removed}


def run_isolated(kind: str, cfg, records_dir: Path, work: Path, positions_by_id: dict[str, int], timeout: int) -> dict:
    """One run of ours or rensa bare in a fresh interpreter of this script (`--run-one`), as a stage runs in its own
    process: its seconds are measured inside, after the imports, and no state of this process (the corpus it holds,
    an earlier run's heap) reaches it."""
    cmd = [sys.executable, __file__, "--run-one", kind, "--cfg", cfg.model_dump_json(), "--input", str(records_dir), "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["removed"] = sorted(positions_by_id[i] for i in out.pop("removed_ids"))
    return out


def run_one(args) -> None:
    """The child of run_isolated: every library either side uses is imported first, then one timed run."""
    import datasketch  # noqa: F401
    import rensa  # noqa: F401
    import scipy.sparse.csgraph  # noqa: F401

    from llmops.params.dedup import DedupConfig

    cfg = DedupConfig.model_validate_json(args.cfg)
    out = run_ours(cfg, Path(args.input), Path(args.work)) if args.run_one == "ours" else run_rensa_bare(cfg, Path(args.input))
    print(json.dumps(out))


def run_peer(python: str, script: str, export_dir: Path, extra: list[str], timeout: int) -> dict:
    cmd = [python, str(PEERS / script), "--input", str(export_dir), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    process_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = process_s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", help="directory of validated part-*.parquet shards (default: ingest + validate the default corpus)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--textdedup-python", default="/tmp/peervenv/bin/python")
    ap.add_argument("--datatrove-python", default="/tmp/dtvenv/bin/python")
    ap.add_argument("--peer-timeout", type=int, default=900)
    ap.add_argument("--seeds", type=int, default=20, help="MinHash seeds of the planted-pair sweep (seed_sweep); 0 = none")
    ap.add_argument("--repeat", type=int, default=1, help="timed rounds over every engine (the median is reported); the planted run is done once")
    ap.add_argument("--out", default=str(RESULTS / "dedup.json"))
    ap.add_argument("--run-one", choices=["ours", "bare"], help=argparse.SUPPRESS)  # internal: run_isolated's child
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        run_one(args)
        return

    base_cfg = load_params(Path(args.params)).dedup.model_copy(update={"threshold": 0.7, "shingle_words": 5, "num_perm": 128})
    bands = minhash.lsh_bands(base_cfg.threshold, base_cfg.num_perm)
    rows = base_cfg.num_perm // bands
    cpus = os.cpu_count() or 1

    work_ctx = tempfile.TemporaryDirectory(prefix="bench-dedup-")
    work = Path(work_ctx.name)
    base = prepare_input(args, work)
    planted, originals = plant(base)
    n = base.num_rows
    copies = list(range(n, n + PLANTED_DOCS))
    base_texts = base.column("text").to_pylist()
    planted_texts = planted.column("text").to_pylist()
    pair_jaccard = [true_jaccard(base_texts[o], planted_texts[c], base_cfg.shingle_words) for o, c in zip(originals, copies)]
    sweep = seed_sweep([base_texts[o] for o in originals], [planted_texts[c] for c in copies], base_cfg, args.seeds) if args.seeds else {}
    inputs = {}
    for name, table in (("base", base), ("planted", planted)):
        write_records(work / name / "records", table, shard_max_bytes=base_cfg.shard_max_bytes)
        export_for_peers(table, work / name / "export", shards=cpus)
        inputs[name] = {
            "records": work / name / "records",
            "export": work / name / "export",
            "positions": {rid: i for i, rid in enumerate(table.column("id").to_pylist())},
            "docs": table.num_rows,
            "bytes": sum(len(t.encode("utf-8", "surrogatepass")) for t in table.column("text").to_pylist()),
        }

    lsh_args = ["--bands", str(bands), "--rows", str(rows), "--ngram", str(base_cfg.shingle_words), "--workers", str(cpus), "--seed", str(base_cfg.seed)]
    engines = [
        ("ours rensa w0", "ours", base_cfg.model_copy(update={"engine": "rensa", "workers": 0})),
        ("ours rensa w1", "ours", base_cfg.model_copy(update={"engine": "rensa", "workers": 1})),
        ("ours datasketch w0", "ours", base_cfg.model_copy(update={"engine": "datasketch", "workers": 0})),
        ("rensa bare (RMinHash + RMinHashLSH, 1 process)", "rensa-bare", base_cfg),
        ("text-dedup 0.4.1 (verify)", "peer", (args.textdedup_python, "textdedup_minhash.py",
                                                [*lsh_args, "--threshold", str(base_cfg.threshold), "--num-perm", str(base_cfg.num_perm), "--verify"])),
        ("text-dedup 0.4.1 (default, no verify)", "peer", (args.textdedup_python, "textdedup_minhash.py",
                                                            [*lsh_args, "--threshold", str(base_cfg.threshold), "--num-perm", str(base_cfg.num_perm)])),
        ("datatrove 0.10.1", "peer", (args.datatrove_python, "datatrove_minhash.py", lsh_args)),
    ]
    notes = {
        "ours": "exact dedup (sha256 of normalised text) first, then MinHash LSH on word 5-grams (words split at ASCII whitespace, shingles hashed in numpy: minhash.shingle_hashes); "
                "candidates verified by signature-estimated Jaccard >= threshold; keeps the lowest position of a cluster",
        "text-dedup": "tokens = lowercased text split on \\W (punctuation dropped), so its 5-grams differ from ours; "
                      "xxh3 32-bit universal hashing; min_length=1 (its default 5 would drop docs under 5 tokens); "
                      "bands/rows passed explicitly = ours; 'verify' = check_false_positive (exact Jaccard on its n-gram sets, "
                      "keeps the lowest index); 'default' = no verification, every band collision is a duplicate; in 0.4.1 that path keeps a record only when its polars_grouper group label equals its own index, so it can drop every member of a cluster (3 identical docs -> 2 removed but the wrong ones; 2 identical docs -> both removed)",
        "datatrove": "tokenizer replaced by str.split and text normalisation off (default needs spaCy and lowercases/strips "
                     "punctuation), so its shingles equal ours (but for non-ASCII whitespace, which str.split also splits at); xxhash64 + 64-bit universal hashing; num_buckets/hashes_per_bucket = ours; "
                     "no verification step; union-by-size may keep a different member of a cluster than ours",
    }

    def run_engine(label: str, kind: str, spec, run_name: str) -> dict:
        inp = inputs[run_name]
        if kind in ("ours", "rensa-bare"):
            out_dir = work / "out" / label.replace(" ", "_") / run_name
            shutil.rmtree(out_dir, ignore_errors=True)
            return run_isolated("ours" if kind == "ours" else "bare", spec, inp["records"], out_dir, inp["positions"], args.peer_timeout)
        python, script, extra = spec
        if not Path(python).exists():
            raise FileNotFoundError(f"peer interpreter {python} not found (see the setup in this file's docstring)")
        return run_peer(python, script, inp["export"], extra, args.peer_timeout)

    results = [{"engine": label, "base_seconds": []} for label, _, _ in engines]
    for round_ in range(args.repeat):  # rounds alternate the engines, so a drift of the machine's speed reaches all of them
        for entry, (label, kind, spec) in zip(results, engines):
            if entry.get("status", "ok") != "ok":
                continue
            try:
                for run_name in ("base", "planted") if round_ == 0 else ("base",):
                    out = run_engine(label, kind, spec, run_name)
                    entry.setdefault(run_name, out)
                    if run_name == "base":
                        entry["base_seconds"].append(out["seconds"])
                entry["status"] = "ok"
            except Exception as exc:  # a peer that cannot run is reported, not fatal
                entry["status"] = f"failed: {type(exc).__name__}: {str(exc)[-1500:]}"
            print(f"round {round_ + 1}, {label}: {entry['status'][:200]}" + (f" ({entry['base_seconds'][-1]:.1f}s)" if entry["status"] == "ok" else ""), file=sys.stderr)

    reference = set(results[0]["base"]["removed"])
    for r in results:
        if r["status"] != "ok":
            continue
        removed = set(r["base"]["removed"])
        r["seconds"] = sorted(r["base_seconds"])[len(r["base_seconds"]) // 2]  # the median round
        r["mb_per_s"] = inputs["base"]["bytes"] / 1e6 / r["seconds"]
        r["docs_removed"] = len(removed)
        r["agree_both"] = len(removed & reference)
        r["only_ours"] = len(reference - removed)
        r["only_this"] = len(removed - reference)
        # Planted pairs: caught if the copy, or (newly) its original, is removed.
        planted_removed = set(r["planted"]["removed"])
        new = planted_removed - removed
        caught = [c in planted_removed or (o in new) for o, c in zip(originals, copies)]
        members = set(copies) | set(originals)
        r["planted_recall"] = sum(caught) / PLANTED_DOCS
        r["planted_precision"] = len(new & members) / len(new) if new else None
        r["planted_new_removals"] = len(new)
        r["planted_recall_true_j_ge_threshold"] = (
            sum(c for c, j in zip(caught, pair_jaccard) if j >= base_cfg.threshold) / max(1, sum(j >= base_cfg.threshold for j in pair_jaccard))
        )


    import datasketch
    import rensa

    report = {
        "benchmark": "bench_dedup",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "input": {"source": args.input or "default corpus (python stdlib) after ingest + validate", "docs": inputs["base"]["docs"], "bytes": inputs["base"]["bytes"]},
        "settings": {"threshold": base_cfg.threshold, "shingle_words": base_cfg.shingle_words, "num_perm": base_cfg.num_perm,
                     "bands": bands, "rows": rows, "seed": base_cfg.seed},
        "planted": {"docs": PLANTED_DOCS, "word_fraction_changed": PLANTED_FRACTION, "seed": PLANT_SEED, "min_words": PLANTED_MIN_WORDS,
                    "original_positions": originals,
                    "true_jaccard_ours_shingles": {"min": min(pair_jaccard), "median": sorted(pair_jaccard)[len(pair_jaccard) // 2],
                                                   "max": max(pair_jaccard), "pairs_at_or_above_threshold": sum(j >= base_cfg.threshold for j in pair_jaccard)},
                    "estimated_jaccard_at_threshold_over_seeds": {"seeds": args.seeds, **sweep}},
        "env": {"python": platform.python_version(), "cpu_count": cpus, "rensa": getattr(rensa, "__version__", "?"), "datasketch": datasketch.__version__},
        "notes": notes,
        "engines": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    work_ctx.cleanup()

    pj = report["planted"]["true_jaccard_ours_shingles"]
    print(f"\nInput: {inputs['base']['docs']:,} docs, {inputs['base']['bytes'] / 1e6:.1f} MB; threshold {base_cfg.threshold}, "
          f"word {base_cfg.shingle_words}-grams, {base_cfg.num_perm} perms = {bands} bands x {rows} rows; {cpus} CPUs")
    print(f"Planted: {PLANTED_DOCS} copies with {PLANTED_FRACTION:.0%} of words replaced; true 5-gram Jaccard to the original "
          f"min {pj['min']:.3f} / median {pj['median']:.3f} / max {pj['max']:.3f}, {pj['pairs_at_or_above_threshold']} of {PLANTED_DOCS} >= {base_cfg.threshold}")
    for name, r in sweep.items():
        print(f"Planted pairs estimated at >= {base_cfg.threshold} over seeds 1..{args.seeds}, {name}: mean {r['mean']:.3f}, sd {r['sd']:.3f}, min {r['min']:.2f}, max {r['max']:.2f}")
    print()
    print("| engine | seconds | MB/s | removed | both | only ours | only this | planted recall | planted precision | recall (true J>=0.7) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r["status"] != "ok":
            print(f"| {r['engine']} | {r['status'][:120]} | | | | | | | | |")
            continue
        prec = f"{r['planted_precision']:.2f}" if r["planted_precision"] is not None else "n/a"
        print(f"| {r['engine']} | {r['seconds']:.2f} | {r['mb_per_s']:.2f} | {r['docs_removed']} | {r['agree_both']} | {r['only_ours']} | "
              f"{r['only_this']} | {r['planted_recall']:.2f} | {prec} | {r['planted_recall_true_j_ge_threshold']:.2f} |")
    print(f"\n'ours' = ours rensa w0. seconds = median of {args.repeat} round(s), each run in a fresh process, timed after its imports; peer seconds exclude interpreter start-up (process_s in the JSON).")
    bare = next((r for r in results if r["engine"].startswith("rensa bare") and r["status"] == "ok"), None)
    if bare and results[0]["status"] == "ok":
        print(f"rensa bare / ours rensa w0: {bare['seconds'] / results[0]['seconds']:.2f}x the time")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
