"""tokenize: train a byte-level BPE (or load model.base's tokenizer), write train/val token shards and their manifest, write drift reference stats.

Writes models/tokenizer/ (HF format, loads with AutoTokenizer) and data/tokens/ with the token shards
train-00000.bin, ... and val-00000.bin, ... (flat token ids, EOS after every document), manifest.json (the dtype and
each split's shards in order with their tokens, documents and sha256; llmops.data.token_shards reads them),
meta.json (dtype, counts and the tokenizer's sha256, so a tokenized cache is never reused with another tokenizer)
and reference_stats.json that the drift monitor compares new data against.

The records stream through shard by shard, three times: ids (the split and the BPE sample), the sampled train
text into the BPE trainer, then every document into the token shards. That last pass runs one job per dedup shard
(llmops.data.engine: a process pool or Ray, `tokenize.workers`), each loading the saved tokenizer and writing its
shard's packed ids per split to one file; the files that hold tokens become the token shards, numbered in dedup
shard order, so the bytes do not depend on the engine or the number of workers, and no token is copied twice.
Memory holds a batch of documents, the per-document lengths and the unigram counts (per worker: one batch and its
shard's lengths), never the corpus or its tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from llmops.common.fingerprints import directory_digest
from llmops.common.io import atomic_dir, atomic_write_json, record_shards
from llmops.common.results import StageResult
from llmops.data.tokenizer import (
    REFERENCE_STATS,
    bpe_sample,
    encode_shards,
    load_base_tokenizer,
    reference_stats,
    token_dtype,
    train_bpe,
    validation_mask,
)
from llmops.params.model import ModelConfig
from llmops.params.paths import PathsConfig
from llmops.params.tokenize import TokenizeConfig

# properties of the tokenizer built: MLflow params, not metrics
TOKENIZE_FACTS = ("vocab_size", "eos_token_id")


def _batches(shards: list[Path], batch_docs: int, columns: list[str]) -> Iterator[tuple[int, dict[str, list]]]:
    """(position of the batch's first document, its columns) over every shard, in order."""
    position = 0
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_docs, columns=columns):
            yield position, {c: batch.column(c).to_pylist() for c in columns}
            position += batch.num_rows


def _sizes(shards: list[Path], batch_docs: int) -> tuple[list[str], np.ndarray]:
    import pyarrow.compute as pc

    ids, sizes = [], []
    for shard in shards:
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_docs, columns=["id", "text"]):
            ids += batch.column("id").to_pylist()
            sizes.append(pc.binary_length(batch.column("text").fill_null("")).to_numpy(zero_copy_only=False))
    return ids, np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, np.int64)


def run(cfg: TokenizeConfig, model: ModelConfig, paths: PathsConfig) -> StageResult:
    tokens_dir, tokenizer_dir = paths.tokens, paths.tokenizer
    shards = record_shards(paths.dedup)
    ids, sizes = _sizes(shards, cfg.batch_docs)
    is_val = validation_mask(ids, cfg)
    sample = bpe_sample(ids, sizes, ~is_val, cfg.train_sample_bytes, cfg.split_seed)

    def sampled_texts() -> Iterator[str]:
        for start, cols in _batches(shards, cfg.batch_docs, ["text"]):
            yield from (t for k, t in enumerate(cols["text"]) if sample[start + k])

    started = time.perf_counter()
    tokenizer = load_base_tokenizer(model.base_at(paths.root)) if model.base else train_bpe(sampled_texts(), cfg, length=int(sample.sum()))
    train_s = time.perf_counter() - started
    with atomic_dir(tokenizer_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    digest = directory_digest(tokenizer_dir, algorithm="sha256")
    with atomic_dir(tokens_dir) as tmp:
        encoded = encode_shards(tokenizer_dir, shards, is_val, cfg.batch_docs, tmp, workers=cfg.workers)
        tokens, train_lengths = encoded.tokens, encoded.lengths[False]
        stats = reference_stats(tokenizer, None, train_lengths, cfg.length_histogram_bins, counts=encoded.counts)
        meta = {
            "dtype": str(token_dtype(tokenizer)),
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "tokenizer_sha256": digest,
            "tokenizer_source": model.base or "trained",
            "tokenizer_train_docs": 0 if model.base else int(sample.sum()),
            "tokenizer_train_bytes": 0 if model.base else int(sizes[sample].sum()),
            "train_tokens": tokens[False],
            "val_tokens": tokens[True],
            "train_docs": int((~is_val).sum()),
            "val_docs": int(is_val.sum()),
        }
        atomic_write_json(tmp / "meta.json", meta)
        atomic_write_json(tmp / REFERENCE_STATS, stats)
    total_tokens = tokens[False] + tokens[True]
    metrics = {
        **{k: v for k, v in meta.items() if k not in ("dtype", "tokenizer_sha256", "tokenizer_source")},
        "tokens": total_tokens,
        "tokens_per_s": total_tokens / encoded.seconds if encoded.seconds > 0 else 0.0,
        "chars_per_token": encoded.chars / total_tokens if total_tokens else 0.0,
        "tokenizer_train_s": train_s,
        "unk_rate": stats["unk_rate"],
        "byte_fallback_rate": stats["byte_fallback_rate"],
        "doc_length_tokens_p50": float(np.percentile(train_lengths, 50)) if train_lengths.size else 0.0,
        "doc_length_tokens_p95": float(np.percentile(train_lengths, 95)) if train_lengths.size else 0.0,
    }
    files = {split: len(listed) for split, listed in encoded.manifest["splits"].items()}
    summary = (
        f"tokenize: {meta['train_docs']} train + {meta['val_docs']} val docs -> {meta['train_tokens']:,} + {meta['val_tokens']:,} tokens "
        f"in {files['train']} + {files['val']} shard files "
        f"(vocab {meta['vocab_size']}, {metrics['tokens_per_s']:,.0f} tokens/s on {encoded.ran_on}) at {tokens_dir}; tokenizer at {tokenizer_dir}"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=[tokens_dir / REFERENCE_STATS, tokenizer_dir], facts=TOKENIZE_FACTS)
