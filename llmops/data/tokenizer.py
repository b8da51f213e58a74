"""Tokenizers and token shards: the deterministic train/val split by document id, byte-level BPE training (or a base
model's tokenizer), encoding + packing with EOS between documents into the token shards and their manifest, and the
reference statistics (length histogram, unigrams, unk and byte-fallback rates) that the drift monitor compares new
data against."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llmops.common import env
from llmops.common.errors import DataError
from llmops.common.fingerprints import file_sha256
from llmops.common.io import atomic_write_json
from llmops.common.progress import progress
from llmops.data.engine import map_jobs
from llmops.data.token_shards import MANIFEST, SPLITS, shard_file_name
from llmops.params.tokenize import TokenizeConfig

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
REFERENCE_STATS = "reference_stats.json"  # in data/tokens/: what the drift monitor compares a batch with
# A pool of one-thread processes is chosen over one process with tokenizers' threads when the shards keep it at least
# this busy (pool_fill). Measured on 2 cores shared with other work (benchmarks/bench_tokenize.py --repeat 3, medians):
# on the stdlib corpus, 2 shards of 16.2 and 14.7 MB (fill 0.96), the pool encoded at 1.35x bare tokenizers' speed and
# the one process at 1.02x; on 400 of its documents in 19 shards (fill 0.98), 1.41x and 1.01x. A pool runs at about
# its fill times its full speed, so it wins down to a fill of about 0.75.
MIN_POOL_FILL = 0.75


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
    """What an encode wrote: tokens per side (False = train, True = validation), each document's length in tokens per
    side, the train split's unigram counts, characters read, and seconds spent."""

    tokens: dict[bool, int]
    lengths: dict[bool, np.ndarray]
    counts: np.ndarray
    chars: int
    seconds: float
    ran_on: str = ""  # where the encoding ran (encode_shards), for the stage's summary line
    sha256: dict[bool, str] = field(default_factory=dict)  # of each side's part file that holds tokens (encode_shard)
    manifest: dict[str, Any] = field(default_factory=dict)  # the manifest.json encode_shards wrote


def encode_stream(
    tokenizer: Any, batches: Iterable[tuple[int, list[str]]], is_val: np.ndarray, out: dict[bool, BinaryIO], desc: str = "", total: int | None = None
) -> Encoded:
    """Encode `(first document's position, texts)` batches in order, appending each side's packed ids to `out[side]`.

    Memory holds one batch; the train split's unigram counts are summed as the batches go by. A progress bar per
    batch when `desc` is given."""
    started = time.perf_counter()
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    lengths: dict[bool, list[np.ndarray]] = {False: [], True: []}
    tokens = {False: 0, True: 0}
    chars = 0
    for start, texts in progress(batches, desc=desc, unit="batch", total=total) if desc else batches:
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


def load_saved_tokenizer(tokenizer_dir: str | Path) -> Any:
    """The tokenizer a stage saved (save_pretrained), from its directory only; loaded once per process while the
    directory holds the same tokenizer.json (a worker process runs many shard jobs)."""
    tokenizer_json = os.stat(Path(tokenizer_dir) / "tokenizer.json")
    return _load_saved_tokenizer(str(tokenizer_dir), (tokenizer_json.st_ino, tokenizer_json.st_mtime_ns, tokenizer_json.st_size))


@lru_cache(maxsize=1)
def _load_saved_tokenizer(tokenizer_dir: str, _version: tuple[int, int, int]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def encode_shard(tokenizer_dir: str, shard: str, is_val: np.ndarray, batch_docs: int, parts: dict[bool, str], counts_file: str, driver_pid: int) -> Encoded:
    """One encode_shards job: the shard's documents in batches of `batch_docs`, each side's packed ids written to
    `parts[side]` and hashed (sha256, here, in parallel with the other jobs); `is_val` holds the shard's rows only.
    The train unigram counts go to `counts_file` (np.save), not into the result, so the driver holds one
    vocabulary-sized vector, not one per shard. Memory: one batch and the shard's document lengths.

    In the driver process (one job at a time) tokenizers' Rust threads use every core. Anywhere else the job is one
    of many worker processes, one per core, so it encodes on one thread. A forked worker must not touch the Rust
    thread pool at all: it was started in the parent (the BPE training, an earlier encode) and its threads do not
    survive the fork, so with TOKENIZERS_PARALLELISM=true (what llmops.common.env.OFFLINE sets) encode_batch_fast
    in a forked child waits forever (tokenizers 0.23.3, measured)."""
    import pyarrow.parquet as pq

    in_driver = os.getpid() == driver_pid
    if not in_driver:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at every encode_batch call
    tokenizer = load_saved_tokenizer(tokenizer_dir)

    def batches() -> Iterator[tuple[int, list[str]]]:
        start = 0
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_docs, columns=["text"]):
            yield start, batch.column("text").to_pylist()
            start += batch.num_rows

    with open(parts[False], "wb") as train, open(parts[True], "wb") as val:
        desc = f"tokenize: encode {Path(shard).name}" if in_driver else ""
        encoded = encode_stream(tokenizer, batches(), is_val, {False: train, True: val}, desc=desc, total=-(-len(is_val) // batch_docs))
    np.save(counts_file, encoded.counts)
    sha256 = {side: file_sha256(Path(parts[side])) for side in (False, True) if encoded.tokens[side]}
    return replace(encoded, counts=np.zeros(0, np.int64), sha256=sha256)


def pool_fill(shard_bytes: list[int], workers: int) -> float:
    """The share of `workers` processes' time spent encoding when the shards run in order, one thread each, every
    shard on the first process free (the process pool's order), its time proportional to its text bytes."""
    busy_until = [0] * workers
    for size in shard_bytes:
        busy_until[busy_until.index(min(busy_until))] += size
    return sum(shard_bytes) / (workers * max(busy_until)) if sum(shard_bytes) else 0.0


def shard_text_bytes(shards: list[Path]) -> list[int]:
    """Each shard's text column, uncompressed, from its Parquet footer: the encoding work a shard holds."""
    import pyarrow.parquet as pq

    sizes = []
    for shard in shards:
        meta = pq.ParquetFile(shard).metadata
        text = meta.schema.names.index("text")
        sizes.append(sum(meta.row_group(g).column(text).total_uncompressed_size for g in range(meta.num_row_groups)))
    return sizes


def encode_workers(workers: int, shard_bytes: list[int]) -> int:
    """The `workers` encode_shards hands map_jobs: `workers` when set (or under Ray, where it sizes a local Ray);
    else one process per core when the shards keep them busy (pool_fill >= MIN_POOL_FILL), else 1: one process whose
    tokenizers threads share every batch over every core (worker processes encode on one thread, see encode_shard)."""
    if workers or env.data_engine() == "ray":
        return workers
    cores = os.cpu_count() or 1
    return cores if pool_fill(shard_bytes, cores) >= MIN_POOL_FILL else 1


def encode_shards(tokenizer_dir: Path, shards: list[Path], is_val: np.ndarray, batch_docs: int, out_dir: Path, workers: int = 0) -> Encoded:
    """Every shard encoded as a map_jobs job (encode_shard) into its own part files, which are renamed (not copied)
    into `out_dir` as the splits' token shards, numbered in shard order: `train-00000.bin`, ..., `val-00000.bin`, ...
    (llmops.data.token_shards). A part with no document of its split is dropped, so no shard file is empty and a split
    with no documents has none. manifest.json lists each split's shards with tokens, documents and sha256.

    A split's shards concatenated in manifest order are the bytes of one encode_stream over the shards in order, and
    every file is the same whatever the engine or the number of workers. `is_val` covers every document of every
    shard, in order; `out_dir` must be on a filesystem every worker sees (the stage's temp output), its part files go
    to `out_dir`/.parts meanwhile. `seconds` is wall time."""
    import pyarrow.parquet as pq

    tokenizer = load_saved_tokenizer(tokenizer_dir)  # loaded and cached before the pool forks: forked workers inherit it
    started = time.perf_counter()
    scratch = out_dir / ".parts"
    scratch.mkdir()
    rows = np.cumsum([0] + [pq.ParquetFile(shard).metadata.num_rows for shard in shards])
    if rows[-1] != len(is_val):
        raise DataError(f"tokenize: the shards hold {rows[-1]} documents but the split covers {len(is_val)}; were they rewritten meanwhile? Run tokenize again.")
    parts = [{side: str(scratch / shard_file_name(SPLITS[side], i)) for side in (False, True)} for i in range(len(shards))]
    counts_files = [str(scratch / f"counts-{i:05d}.npy") for i in range(len(shards))]
    jobs = [(str(tokenizer_dir), str(shard), is_val[rows[i] : rows[i + 1]], batch_docs, parts[i], counts_files[i], os.getpid()) for i, shard in enumerate(shards)]
    workers = encode_workers(workers, shard_text_bytes(shards))
    if env.data_engine() == "ray":
        ran_on = "Ray"
    elif min(workers, len(shards)) > 1:
        ran_on = f"{min(workers, len(shards))} processes"
    else:
        ran_on = "1 process, tokenizers threads"
    results: list[Encoded] = map_jobs(encode_shard, jobs, workers=workers, desc="tokenize: encode")
    counts = None
    listed: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for shard_parts, counts_file, result in zip(parts, counts_files, results, strict=True):
        for side, part in shard_parts.items():
            split = SPLITS[side]
            if not result.tokens[side]:
                os.remove(part)
                continue
            name = shard_file_name(split, len(listed[split]))
            os.replace(part, out_dir / name)
            listed[split].append({"file": name, "tokens": result.tokens[side], "docs": int(result.lengths[side].size), "sha256": result.sha256[side]})
        shard_counts = np.load(counts_file)
        counts = shard_counts if counts is None else counts + shard_counts
        os.remove(counts_file)
    scratch.rmdir()
    manifest = {"dtype": str(token_dtype(tokenizer)), "splits": listed}
    atomic_write_json(out_dir / MANIFEST, manifest)
    empty = np.zeros(0, np.int64)
    return Encoded(
        tokens={side: sum(r.tokens[side] for r in results) for side in (False, True)},
        lengths={side: np.concatenate([empty, *(r.lengths[side] for r in results)]) for side in (False, True)},
        counts=counts if counts is not None else empty,
        chars=sum(r.chars for r in results),
        seconds=time.perf_counter() - started,
        ran_on=ran_on,
        manifest=manifest,
    )


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
