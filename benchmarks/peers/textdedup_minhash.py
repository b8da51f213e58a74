"""Run text-dedup 0.4.1's MinHash near-dedup on a Parquet export and print what it removed, as JSON.

Runs inside a separate venv (text-dedup 0.4.1 requires Python >= 3.12; the project venv is 3.11):

    /root/.pyenv/versions/3.12.1/bin/python3.12 -m venv /tmp/peervenv
    /tmp/peervenv/bin/pip install text-dedup==0.4.1
    /tmp/peervenv/bin/python benchmarks/peers/textdedup_minhash.py --input DIR --bands 16 --rows 8 ...

The input has columns `id` (the record's position in our table, as a string) and `text`.
Output (stdout, last line): {"seconds", "removed": [positions], "prefiltered": [positions], "settings"}.
`seconds` is text-dedup's own minhash.main() (load, filter, hash, cluster, verify, save), not
this interpreter's start-up and imports.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True, help="directory of *.parquet with columns id, text")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--bands", type=int, required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--verify", action="store_true", help="check_false_positive: exact Jaccard of candidate pairs")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="textdedup-"))
    # A fresh HF datasets cache per run: otherwise a second run reuses cached map() results and times nothing.
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-cache")
    os.environ["HF_DATASETS_OFFLINE"] = "1"

    # text-dedup's Config reads only a TOML file (settings_customise_sources drops init kwargs).
    toml = f"""
[input]
input_type = "local_files"
file_type = "parquet"
[input.read_arguments]
path = "parquet"
data_files = "{Path(args.input).resolve()}/*.parquet"
split = "train"

[algorithm]
algorithm_name = "minhash"
text_column = "text"
seed = {args.seed}
num_proc = {args.workers}
num_perm = {args.num_perm}
threshold = {args.threshold}
ngram_size = {args.ngram}
# text-dedup's default min_length=5 drops documents with < 5 tokens before hashing; 1 keeps every
# document with at least one token (shorter ones become one shingle), which is what we do.
min_length = 1
bands = {args.bands}
rows = {args.rows}
check_false_positive = {"true" if args.verify else "false"}

[output]
output_dir = "{work / 'out'}"
keep_index_column = true

[debug]
logging_level = 30
"""
    (work / "config.toml").write_text(toml)

    from datasets import load_from_disk

    from text_dedup import minhash
    from text_dedup.config.base import load_config_from_toml

    config = load_config_from_toml(work / "config.toml")
    start = time.perf_counter()
    minhash.main(config)
    seconds = time.perf_counter() - start

    # Which input rows are gone: the output keeps __INDEX__ (row number in the loaded dataset).
    import pyarrow.parquet as pq

    files = sorted(Path(args.input).glob("*.parquet"))
    ids = [int(i) for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
    texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    kept_rows = set(load_from_disk(str(work / "out"))["__INDEX__"])
    # Rows dropped by its pre-filter (no token at all) are not duplicates: report them apart.
    keep_filter = config.algorithm.get_filtering_func()
    prefiltered = {r for r, t in enumerate(texts) if not keep_filter(t)}
    removed = sorted(ids[r] for r in range(len(ids)) if r not in kept_rows and r not in prefiltered)
    algo = config.algorithm
    print(json.dumps({
        "seconds": seconds,
        "removed": removed,
        "prefiltered": sorted(ids[r] for r in prefiltered),
        "settings": {"bands": algo.bands, "rows": algo.rows, "num_perm": algo.num_perm, "ngram_size": algo.ngram_size,
                     "threshold": algo.threshold, "min_length": algo.min_length, "hash": f"{algo.hash_func_name}/{algo.hash_bits}",
                     "check_false_positive": algo.check_false_positive, "num_proc": algo.num_proc},
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
