"""Tokenizers and token arrays: the deterministic train/val split by document id, byte-level BPE training (or a base
model's tokenizer), encoding + packing with EOS between documents, and the reference statistics (length histogram,
unigrams, unk and byte-fallback rates) that the drift monitor compares new data against."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any, BinaryIO

import numpy as np

from llmops.params.tokenize import TokenizeConfig
from llmops.common.errors import DataError
from llmops.common.progress import progress

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
REFERENCE_STATS = "reference_stats.json"  # in data/tokens/: what the drift monitor compares a batch with


def is_validation_doc(doc_id: str, val_fraction: float, seed: int) -> bool:
    """Deterministic split by document: the same id lands on the same side on every machine."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def validation_mask(ids: list[str], cfg: TokenizeConfig) -> np.ndarray:
    """Which documents are held out (by a hash of the id); a tiny corpus with none still gets its last train document."""
    mask = np.array([is_validation_doc(doc_id, cfg.val_fraction, cfg.split_seed) for doc_id in ids], dtype=bool)
    if not mask.any() and len(mask) > 1:
        mask[-1] = True
    if mask.all():
        raise DataError(f"tokenize: {len(ids)} document(s) leave nothing to train on; lower tokenize.val_fraction or add data.")
    return mask


def bpe_sample(ids: list[str], sizes: np.ndarray, candidates: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """The documents the BPE learns from: candidates in the order of a hash of their id, taken while the bytes fit
    `budget` (0 = all); a mask over every document, so the sample is the same whatever the shard layout."""
    chosen = np.zeros(len(ids), dtype=bool)
    positions = np.flatnonzero(candidates)
    if not budget or int(sizes[positions].sum()) <= budget:
        chosen[positions] = True
        return chosen
    order = sorted(positions, key=lambda i: hashlib.sha256(f"bpe:{seed}:{ids[i]}".encode()).digest())
    total = 0
    for i in order:
        if total + sizes[i] > budget and total:
            continue
        chosen[i] = True
        total += int(sizes[i])
    return chosen


def train_bpe(texts: Iterable[str], cfg: TokenizeConfig, length: int | None = None) -> Any:
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
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length if length is not None else len(texts))  # type: ignore[arg-type]
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


def token_dtype(tokenizer: Any) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)


def encode_batch(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Flat token ids of `texts` with EOS after every document, and each document's length in tokens.

    `encode_batch_fast` (tokenizers' Rust threads, no per-token offsets) does the encoding; the ids are packed with one
    numpy pass (`np.fromiter` over the chained id lists, then the EOS ids inserted at each document's end)."""
    dtype = token_dtype(tokenizer)
    backend = tokenizer.backend_tokenizer
    # Text that spells a special token ("<|endoftext|>" in a docstring) is data, not a document
    # boundary: encode it as ordinary text so only the EOS we insert separates documents.
    backend.encode_special_tokens = True
    ids = [enc.ids for enc in backend.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return np.insert(flat, np.cumsum(lengths), tokenizer.eos_token_id), lengths


@dataclass
class Encoded:
    """What `encode_stream` wrote: tokens per side (False = train, True = validation), each document's length in
    tokens per side, the train split's unigram counts, characters read, and seconds spent."""

    tokens: dict[bool, int]
    lengths: dict[bool, np.ndarray]
    counts: np.ndarray
    chars: int
    seconds: float


def encode_stream(
    tokenizer: Any, batches: Iterable[tuple[int, list[str]]], is_val: np.ndarray, out: dict[bool, BinaryIO], total: int | None = None
) -> Encoded:
    """Encode `(first document's position, texts)` batches in order, appending each side's packed ids to `out[side]`.

    Memory holds one batch; the train split's unigram counts are summed as the batches go by."""
    started = time.perf_counter()
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    lengths: dict[bool, list[np.ndarray]] = {False: [], True: []}
    tokens = {False: 0, True: 0}
    chars = 0
    for start, texts in progress(batches, desc="tokenize: encode", unit="batch", total=total):
        chars += sum(map(len, texts))
        side = is_val[start : start + len(texts)]
        for held_out in (False, True):
            chosen = [t for t, v in zip(texts, side, strict=True) if v == held_out]
            if not chosen:
                continue
            packed, doc_lengths = encode_batch(tokenizer, chosen)
            packed.tofile(out[held_out])
            lengths[held_out].append(doc_lengths)
            tokens[held_out] += int(packed.size)
            if not held_out:
                counts += np.bincount(packed, minlength=len(tokenizer))
    joined = {side: np.concatenate(parts) if parts else np.zeros(0, np.int64) for side, parts in lengths.items()}
    return Encoded(tokens=tokens, lengths=joined, counts=counts, chars=chars, seconds=time.perf_counter() - started)


def encode_and_pack(tokenizer: Any, texts: list[str], batch_docs: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """encode_batch over an in-memory list, `batch_docs` documents at a time."""
    parts = [encode_batch(tokenizer, texts[i : i + batch_docs]) for i in progress(range(0, len(texts), batch_docs), desc=desc, unit="batch")]
    if not parts:
        return np.zeros(0, dtype=token_dtype(tokenizer)), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


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


def reference_stats(tokenizer: Any, train_ids: np.ndarray | None, doc_lengths: np.ndarray, bins: int, counts: np.ndarray | None = None) -> dict[str, Any]:
    """What the drift monitor compares a new batch with: fixed log-spaced length bins, unigram counts, rates.

    Give the token ids, or their unigram `counts` when they were counted as they streamed by."""
    edges = np.unique(np.round(np.geomspace(1, 1_000_000, bins + 1)).astype(np.int64))
    hist, _ = np.histogram(np.clip(doc_lengths, 1, edges[-1]), bins=edges)
    if counts is None:
        counts = np.bincount(np.asarray(train_ids).astype(np.int64), minlength=len(tokenizer))
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
