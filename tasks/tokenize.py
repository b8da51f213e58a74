"""tokenize: train a byte-level BPE (or load model.base's tokenizer), pack train/val token arrays, write drift reference stats.

Writes models/tokenizer/ (HF format, loads with AutoTokenizer) and data/tokens/ with
train.bin / val.bin (flat token ids, EOS between documents), meta.json (dtype, counts and
the tokenizer's sha256, so a tokenized cache is never reused with another tokenizer) and
reference_stats.json that the drift monitor compares new data against.
"""

from __future__ import annotations

import time

import numpy as np

from llmops.common.fingerprints import directory_digest
from llmops.common.io import atomic_dir, atomic_write_json, read_records
from llmops.common.results import StageResult
from llmops.data.tokenizer import REFERENCE_STATS, encode_and_pack, load_base_tokenizer, reference_stats, split_documents, train_bpe
from llmops.params.model import ModelConfig
from llmops.params.paths import PathsConfig
from llmops.params.tokenize import TokenizeConfig


def run(cfg: TokenizeConfig, model: ModelConfig, paths: PathsConfig) -> StageResult:
    tokens_dir, tokenizer_dir = paths.tokens, paths.tokenizer
    table = read_records(paths.dedup)
    train_texts, val_texts = split_documents(table.column("id").to_pylist(), table.column("text").to_pylist(), cfg)
    started = time.perf_counter()
    tokenizer = load_base_tokenizer(model.base_at(paths.root)) if model.base else train_bpe(train_texts, cfg)
    train_s = time.perf_counter() - started
    with atomic_dir(tokenizer_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    digest = directory_digest(tokenizer_dir, algorithm="sha256")
    started = time.perf_counter()
    train_ids, train_lengths = encode_and_pack(tokenizer, train_texts, cfg.batch_docs, "tokenize: train")
    val_ids, val_lengths = encode_and_pack(tokenizer, val_texts, cfg.batch_docs, "tokenize: val")
    encode_s = time.perf_counter() - started
    stats = reference_stats(tokenizer, train_ids, train_lengths, cfg.length_histogram_bins)
    chars = sum(map(len, train_texts)) + sum(map(len, val_texts))
    meta = {
        "dtype": str(train_ids.dtype),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_sha256": digest,
        "tokenizer_source": model.base or "trained",
        "train_tokens": int(train_ids.size),
        "val_tokens": int(val_ids.size),
        "train_docs": len(train_texts),
        "val_docs": len(val_texts),
    }
    with atomic_dir(tokens_dir) as tmp:
        train_ids.tofile(tmp / "train.bin")
        val_ids.tofile(tmp / "val.bin")
        atomic_write_json(tmp / "meta.json", meta)
        atomic_write_json(tmp / REFERENCE_STATS, stats)
    total_tokens = int(train_ids.size + val_ids.size)
    metrics = {
        **{k: v for k, v in meta.items() if k not in ("dtype", "tokenizer_sha256", "tokenizer_source")},
        "tokens": total_tokens,
        "tokens_per_s": total_tokens / encode_s if encode_s > 0 else 0.0,
        "chars_per_token": chars / total_tokens if total_tokens else 0.0,
        "tokenizer_train_s": train_s,
        "unk_rate": stats["unk_rate"],
        "byte_fallback_rate": stats["byte_fallback_rate"],
        "doc_length_tokens_p50": float(np.percentile(train_lengths, 50)) if train_lengths.size else 0.0,
        "doc_length_tokens_p95": float(np.percentile(train_lengths, 95)) if train_lengths.size else 0.0,
    }
    summary = (
        f"tokenize: {len(train_texts)} train + {len(val_texts)} val docs -> {meta['train_tokens']:,} + {meta['val_tokens']:,} tokens "
        f"(vocab {meta['vocab_size']}, {metrics['tokens_per_s']:,.0f} tokens/s) at {tokens_dir}; tokenizer at {tokenizer_dir}"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=[tokens_dir / REFERENCE_STATS, tokenizer_dir])
