"""Run datatrove 0.10's 4-step MinHash dedup on a Parquet export and print what it removed, as JSON.

Runs inside a separate venv (Python 3.12; datatrove's MinHash imports need its `processing`
extra's regex, tokenizers and xxhash<4, which the bare `pip install datatrove` does not bring):

    /root/.pyenv/versions/3.12.1/bin/python3.12 -m venv /tmp/dtvenv
    /tmp/dtvenv/bin/pip install 'datatrove==0.10.*' pyarrow orjson regex tokenizers 'xxhash<4'

Two things in 0.10.1 break out of the box, and how this driver gets around them:
- xxhash 4.x rejects str input ("TypeError: Strings must be encoded before hashing") and
  datatrove hashes str shingles: install xxhash<4 (datatrove[processing] pins it).
- MinhashDedupSignature(language="en") loads a spaCy word tokenizer (ImportError without
  spacy; its WhitespaceTokenizer also goes through spaCy "xx"). We pass a WordTokenizer that is
  str.split() and switch its text normalisation off, so the shingles are exactly ours
  (word 5-grams of whitespace-split, case-kept text).

The input has columns `id` (the record's position in our table, as a string) and `text`.
Output (stdout, last line): {"seconds", "removed": [positions], "settings"}.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from datatrove.utils.word_tokenizers import WordTokenizer


class SplitTokenizer(WordTokenizer):
    """Whitespace split, the tokenization our dedup uses (no spaCy)."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True, help="directory of *.parquet with columns id, text")
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--bands", type=int, required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig

    work = Path(tempfile.mkdtemp(prefix="datatrove-"))
    shards = sorted(Path(args.input).glob("*.parquet"))
    config = MinhashConfig(
        n_grams=args.ngram,
        num_buckets=args.bands,
        hashes_per_bucket=args.rows,
        seed=args.seed,
        hash_config=HashConfig(precision=64, hash_fc="xxhash"),
        norm_config=TextNormConfig(lowercase=False, norm_whitespace=False, remove_punctuation=False,
                                   norm_unicode_diacritics=False, norm_numbers=False),
    )

    def reader():
        return ParquetReader(str(Path(args.input).resolve()), text_key="text", id_key="id")

    # One signature task per input shard (datatrove parallelises by file), one bucket task per band.
    steps = [
        ([reader(), MinhashDedupSignature(str(work / "sigs"), config=config, language=SplitTokenizer())], len(shards)),
        ([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)], config.num_buckets),
        ([MinhashDedupCluster(str(work / "buckets"), str(work / "remove_ids"), config=config)], 1),
        ([reader(), MinhashDedupFilter(str(work / "remove_ids"), exclusion_writer=JsonlWriter(str(work / "removed"), compression=None)),
          JsonlWriter(str(work / "kept"), compression=None)], len(shards)),
    ]
    start = time.perf_counter()
    for i, (pipeline, tasks) in enumerate(steps):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(args.workers, tasks),
                              logging_dir=str(work / f"logs{i}")).run()
    seconds = time.perf_counter() - start

    removed = sorted(int(json.loads(line)["id"]) for f in (work / "removed").glob("*.jsonl") for line in f.open())
    print(json.dumps({
        "seconds": seconds,
        "removed": removed,
        "settings": {"bands": config.num_buckets, "rows": config.hashes_per_bucket, "n_grams": config.n_grams,
                     "hash": str(config.hash_config), "tokenizer": "str.split", "normalisation": "off",
                     "verification": "none (every bucket collision is a duplicate)", "workers": args.workers},
    }))


if __name__ == "__main__":
    main()
