"""Tokenize: train a byte-level BPE (or load model.base's tokenizer), pack train/val token arrays, write drift reference stats.

Writes models/tokenizer/ (HF format, loads with AutoTokenizer) and data/tokens/ with
train.bin / val.bin (flat token ids, EOS between documents), meta.json (dtype, counts and
the tokenizer's sha256, so a tokenized cache is never reused with another tokenizer) and
reference_stats.json (length histogram, unigram distribution, unk and byte-fallback rates)
that the drift monitor compares new data against.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.config import ModelConfig, TokenizeConfig
from tasks.common.errors import DataError
from tasks.common.io import atomic_dir, atomic_write_json, read_records
from tasks.common.result import StageResult, progress

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def is_validation_doc(doc_id: str, val_fraction: float, seed: int) -> bool:
    """Deterministic split by document: the same id lands on the same side on every machine."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_documents(ids: list[str], texts: list[str], cfg: TokenizeConfig) -> tuple[list[str], list[str]]:
    train, val = [], []
    for doc_id, text in zip(ids, texts, strict=True):
        (val if is_validation_doc(doc_id, cfg.val_fraction, cfg.split_seed) else train).append(text)
    if not val and len(train) > 1:
        val.append(train.pop())  # a tiny corpus still gets a held-out document
    if not train:
        raise DataError(f"tokenize: {len(ids)} document(s) leave nothing to train on; lower tokenize.val_fraction or add data.")
    return train, val


def train_bpe(texts: list[str], cfg: TokenizeConfig) -> Any:
    """A byte-level BPE (GPT-2 style: no unknown tokens, every byte is representable) as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def load_base_tokenizer(base: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"model.base={base!r}: cannot load its tokenizer ({exc}). Set model.base to a local HF model directory.") from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"model.base={base!r}: its tokenizer has no eos_token; packing needs one to separate documents.")
    return tokenizer


def encode_and_pack(tokenizer: Any, texts: list[str], batch_docs: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat token ids with EOS after every document, and each document's length in tokens."""
    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    backend = tokenizer.backend_tokenizer
    # Text that spells a special token ("<|endoftext|>" in a docstring) is data, not a document
    # boundary: encode it as ordinary text so only the EOS we insert separates documents.
    backend.encode_special_tokens = True
    batches = [texts[i : i + batch_docs] for i in range(0, len(texts), batch_docs)]
    for batch in progress(batches, desc=desc, unit="batch"):
        for enc in backend.encode_batch(batch, add_special_tokens=False):
            pieces.append(np.asarray(enc.ids + [eos], dtype=dtype))
            lengths.append(len(enc.ids))
    packed = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return packed, np.asarray(lengths, dtype=np.int64)


def byte_fallback_ids(tokenizer: Any) -> np.ndarray:
    """Ids of tokens that stand for one raw non-ASCII byte: text the vocabulary could not cover.

    Byte-level BPE spells a lone byte as one mapped character; SentencePiece as `<0xHH>`.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
    ids = []
    for token, i in tokenizer.get_vocab().items():
        if len(token) == 1 and byte_of_char.get(token, 0) >= 0x80:
            ids.append(i)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">") and int(token[3:5], 16) >= 0x80:
            ids.append(i)
    return np.asarray(sorted(ids), dtype=np.int64)


def reference_stats(tokenizer: Any, train_ids: np.ndarray, doc_lengths: np.ndarray, bins: int) -> dict[str, Any]:
    """What the drift monitor compares a new batch with: fixed log-spaced length bins, unigram counts, rates."""
    edges = np.unique(np.round(np.geomspace(1, 1_000_000, bins + 1)).astype(np.int64))
    hist, _ = np.histogram(np.clip(doc_lengths, 1, edges[-1]), bins=edges)
    counts = np.bincount(train_ids.astype(np.int64), minlength=len(tokenizer))
    total = max(int(counts.sum()), 1)
    unk_id = tokenizer.unk_token_id
    return {
        "doc_length_bin_edges": edges.tolist(),
        "doc_length_histogram": hist.tolist(),
        "unigram_counts": counts.tolist(),
        "unk_rate": float(counts[unk_id] / total) if unk_id is not None else 0.0,
        "byte_fallback_rate": float(counts[byte_fallback_ids(tokenizer)].sum() / total),
        "tokens": total,
        "docs": int(len(doc_lengths)),
    }


def tokenizer_digest(tokenizer_dir: Path) -> str:
    """sha256 over the saved tokenizer files: the cache key of every array tokenized with it."""
    h = hashlib.sha256()
    for path in sorted(tokenizer_dir.iterdir()):
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def run(cfg: TokenizeConfig, model: ModelConfig, dedup_dir: Path, tokens_dir: Path, tokenizer_dir: Path) -> StageResult:
    table = read_records(dedup_dir)
    train_texts, val_texts = split_documents(table.column("id").to_pylist(), table.column("text").to_pylist(), cfg)
    started = time.perf_counter()
    tokenizer = load_base_tokenizer(model.base) if model.base else train_bpe(train_texts, cfg)
    train_s = time.perf_counter() - started
    with atomic_dir(Path(tokenizer_dir)) as tmp:
        tokenizer.save_pretrained(tmp)
    digest = tokenizer_digest(Path(tokenizer_dir))
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
    with atomic_dir(Path(tokens_dir)) as tmp:
        train_ids.tofile(tmp / "train.bin")
        val_ids.tofile(tmp / "val.bin")
        atomic_write_json(tmp / "meta.json", meta)
        atomic_write_json(tmp / "reference_stats.json", stats)
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
    return StageResult(metrics=metrics, summary=summary, artifacts=[Path(tokens_dir) / "reference_stats.json", Path(tokenizer_dir)])
