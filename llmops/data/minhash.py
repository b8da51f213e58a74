"""Exact (normalized text) and near-duplicate (MinHash LSH, verified by estimated Jaccard) detection over arrays, so it
runs shard by shard on any corpus size. The dedup stage and the drift monitor use it.

- Signatures: rensa (or datasketch) MinHash of word shingles, hashed in numpy (shingle_hashes), one uint32 row of
  `num_perm` values per document, computed per shard (or per chunk of texts) in worker processes.
- Exact duplicates: the sha256 of the normalized text; the first occurrence is kept (numpy's unique).
- LSH: a document's signature cut into `bands` slices; documents with an identical slice in some band are
  candidates (a sort per band: the "shuffle" by band key), the same candidates rensa's or datasketch's LSH index gives.
- Verification: estimated Jaccard (share of equal signature values) at or above the threshold.
- Clusters: connected components of the verified pairs (scipy); each cluster keeps its first document.

The dedup stage keeps the signatures on disk (SignatureColumns) and reads them a band, or a permutation, at a
time; the drift monitor's small lists keep them in memory. Both give the same pairs and similarities.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmops.common.io import release_free_memory
from llmops.data.engine import imap_jobs, map_jobs
from llmops.params.dedup import DedupConfig

SIGNATURE_CHUNK_DOCS = 64  # texts per task when signatures of an in-memory list are spread over processes
SHARD_BATCH_DOCS = 64  # documents of a shard held as shingles at once (256: 1.18x the peak memory of a worker, same speed)
VERIFY_CHUNK_PAIRS = 65_536
VERIFY_COLUMN_PAIRS = 1_048_576  # pairs verified per read of every permutation from disk
CANDIDATE_CHUNK_PAIRS = 1_048_576  # LSH candidate pairs generated, then verified, at a time


def normalize(text: str) -> str:
    """Text as compared for exact duplicates: trailing whitespace and blank edges do not count."""
    return "\n".join(map(str.rstrip, text.strip().splitlines()))


def exact_key(text: str) -> bytes:
    return hashlib.sha256(normalize(text).encode("utf-8", "surrogatepass")).digest()


def has_words(text: str) -> bool:
    """Whether the text has a word (str.split's whitespace), so it can be a near duplicate."""
    return bool(text) and not text.isspace()


# Shingles, as hashes. A word is a run of bytes of the UTF-8 text that are not ASCII whitespace (space, \t \n \v \f
# \r); a shingle is `shingle_words` consecutive words of one document (a document of fewer words is one shingle of all
# of them). Each word is hashed over its bytes (a polynomial hash modulo 2**64 plus its length, then the splitmix64
# finalizer) and each shingle over its words' hashes, all in numpy over a whole batch of documents, so no Python
# object is made per word or shingle; rensa (or datasketch) turns the shingle hashes into MinHash signatures. A
# signature depends on this definition: SHINGLE_FORMAT names it in signature_settings, so signatures saved under
# another one are never compared with these.
SHINGLE_FORMAT = "word-ngram-hash64-v1"
WINDOW_BYTES = 1 << 18  # bytes hashed at once (about 30 bytes of temporaries per byte: 8 MB); cut at whitespace
DIGEST_BATCH_BYTES = 4 << 20  # text shingled at once by digest_matrix (word and shingle arrays: about 13 bytes per byte)
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
_BASE = 0x100000001B3  # odd, so invertible modulo 2**64
_ODD = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9)
_powers: dict[str, np.ndarray] = {}


def _word_weights(n: int) -> np.ndarray:
    """The odd multipliers of a shingle's 1st, 2nd, ... word hash (past the 8th, the 8 again times 3, then 5, ...)."""
    return np.array([_ODD[k % len(_ODD)] * (k // len(_ODD) * 2 + 1) % (1 << 64) for k in range(n)], dtype=np.uint64)


def _power_tables() -> tuple[np.ndarray, np.ndarray]:
    """_BASE**k and _BASE**-k modulo 2**64 for k in 0 .. WINDOW_BYTES (built once per process, 4 MB)."""
    if not _powers or len(_powers["up"]) < WINDOW_BYTES + 1:
        for name, base in (("up", _BASE), ("down", pow(_BASE, -1, 1 << 64))):
            steps = np.full(WINDOW_BYTES + 1, base, dtype=np.uint64)
            steps[0] = 1
            _powers[name] = np.cumprod(steps)  # uint64 products wrap modulo 2**64
    return _powers["up"], _powers["down"]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit moves every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _word_hashes(data: np.ndarray, breaks: np.ndarray, doc_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start offset, hash) of each word in `data` (uint8, at most WINDOW_BYTES); `breaks` marks whitespace bytes,
    `doc_start` the first byte of each document, where a word begins whatever precedes it."""
    up, down = _power_tables()
    word = ~breaks
    starts = np.flatnonzero(word & (np.r_[True, breaks[:-1]] | doc_start))
    ends = np.flatnonzero(word & np.r_[breaks[1:] | doc_start[1:], True]) + 1
    prefix = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum(data * up[: len(data)], out=prefix[1:])
    return starts, _mix64((prefix[ends] - prefix[starts]) * down[starts] + (ends - starts).astype(np.uint64))


def _as_arrow(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """The texts as one Arrow array (strings encoded as UTF-8, lone surrogates kept, as large_binary)."""
    if isinstance(texts, pa.ChunkedArray):
        return texts.combine_chunks()
    if isinstance(texts, pa.Array):
        return texts
    return pa.array([t.encode("utf-8", "surrogatepass") for t in texts], type=pa.large_binary())


def _utf8(texts: Sequence[str] | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The texts' UTF-8 bytes, concatenated, and each text's (start, end) offsets (n + 1 int64), read from an Arrow
    string array's own buffers where given."""
    texts = _as_arrow(texts)
    if not any(check(texts.type) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)):
        raise TypeError(f"texts of Arrow type {texts.type}: expected string, large_string, binary or large_binary")
    if texts.null_count:
        raise ValueError("a text is null")
    large = pa.types.is_large_string(texts.type) or pa.types.is_large_binary(texts.type)
    _, offsets_buf, data_buf = texts.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64 if large else np.int32)[texts.offset : texts.offset + len(texts) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data[offsets[0] : offsets[-1]], offsets - offsets[0]


def shingle_hashes(texts: Sequence[str] | pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The shingle hashes of every text, flat (uint64), and each text's (start, end) in them (n + 1 uint64).

    Shingles repeated in a text are hashed each time (a MinHash is the same for a set and a multiset)."""
    data, offsets = _utf8(texts)
    breaks = _WHITESPACE[data]
    doc_start = np.zeros(len(data) + 1, dtype=bool)
    doc_start[offsets[:-1]] = True
    starts, hashes, lo = [], [], 0
    while lo < len(data):
        hi = min(lo + WINDOW_BYTES, len(data))
        if hi < len(data):
            # End the window after its last whitespace byte or before its last document start, so no word is cut; a
            # window with neither (a word longer than WINDOW_BYTES) is cut WINDOW_BYTES after the last cut in its own
            # document, so the hashes of a document never depend on the documents beside it.
            cut = breaks[lo:hi] | doc_start[lo + 1 : hi + 1]  # cut[i]: the window may end at lo + 1 + i
            back = int(np.argmax(cut[::-1]))
            hi = hi - back if cut[len(cut) - 1 - back] else hi
        s, h = _word_hashes(data[lo:hi], breaks[lo:hi], doc_start[lo:hi])
        starts.append(s + lo)
        hashes.append(h)
        lo = hi
    words = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    word_doc = np.searchsorted(offsets, np.concatenate(starts), side="right") - 1 if starts else np.zeros(0, np.int64)
    del starts, hashes, breaks, doc_start
    weights, count = _word_weights(n), max(len(words) - n + 1, 0)
    grams = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        grams += words[k : k + count] * weights[k]
    inside = word_doc[:count] == word_doc[n - 1 : n - 1 + count]  # the shingle's words are all of one document
    grams, gram_doc = grams[inside], word_doc[:count][inside]
    words_per_doc = np.bincount(word_doc, minlength=len(offsets) - 1)
    short = np.flatnonzero((words_per_doc > 0) & (words_per_doc < n))
    if len(short):  # one shingle of all its words
        first, extra = np.searchsorted(word_doc, short), np.zeros(len(short), dtype=np.uint64)
        for k in range(n - 1):
            has = k < words_per_doc[short]
            extra[has] += words[first[has] + k] * weights[k]
        order = np.argsort(np.concatenate([gram_doc, short]), kind="stable")
        grams, gram_doc = np.concatenate([grams, extra])[order], np.concatenate([gram_doc, short])[order]
    counts = np.bincount(gram_doc, minlength=len(offsets) - 1)
    return _mix64(grams), np.r_[0, np.cumsum(counts)].astype(np.uint64)


def lsh_bands(threshold: float, num_perm: int) -> int:
    """Bands (a divisor of num_perm) that minimise false positives + false negatives at `threshold`.

    Uses datasketch's own error integrals; candidates are verified afterwards, so ties go to recall.
    """
    from datasketch.lsh import _false_negative_probability, _false_positive_probability

    divisors = [b for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(
        divisors,
        key=lambda b: (
            _false_positive_probability(threshold, b, num_perm // b) + _false_negative_probability(threshold, b, num_perm // b),
            -b,
        ),
    )


def digest_matrix(engine: str, texts: Sequence[str] | pa.Array, shingle_words: int, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures of `texts` (strings, or an Arrow string array) as a (len(texts), num_perm) uint32 matrix,
    hashed DIGEST_BATCH_BYTES of text at a time: the word and shingle arrays take about 13 bytes per byte of text, so
    they follow that bound (or one document, at most validate.max_chars), not how long the given documents are."""
    out = np.zeros((len(texts), num_perm), dtype=np.uint32)
    if not len(texts):
        return out
    texts = _as_arrow(texts)
    _, offsets = _utf8(texts)
    start = 0
    while start < len(texts):
        stop = max(start + 1, int(np.searchsorted(offsets, offsets[start] + DIGEST_BATCH_BYTES, side="right")) - 1)
        out[start:stop] = _digest(engine, *shingle_hashes(texts.slice(start, stop - start), shingle_words), num_perm, seed)
        start = stop
    return out


def _digest(engine: str, hashes: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures from the flat shingle hashes of documents and each one's (start, end) in them."""
    if engine == "rensa":
        from rensa import RMinHash

        return np.array(RMinHash.digest_matrix_from_flat_token_hashes(hashes, offsets, num_perm, seed).to_rows(), dtype=np.uint32)
    from datasketch import MinHash

    # datasketch permutes 32-bit hashes: the top half of each shingle hash, as its hash function's output.
    values = (hashes >> np.uint64(32)).tolist()
    bounds = offsets.astype(np.int64).tolist()
    minhashes = MinHash.bulk([values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)], num_perm=num_perm, seed=seed, hashfunc=int)
    return np.array([m.hashvalues for m in minhashes], dtype=np.uint32)  # datasketch's values are below 2**32


def signatures(cfg: DedupConfig, texts: list[str]) -> np.ndarray:
    """Signatures of an in-memory list of texts, in chunks as engine jobs (shingling is Python-bound)."""
    jobs = [(cfg.engine, texts[i : i + SIGNATURE_CHUNK_DOCS], cfg.shingle_words, cfg.num_perm, cfg.seed) for i in range(0, len(texts), SIGNATURE_CHUNK_DOCS)]
    workers = 1 if len(jobs) <= 1 else cfg.workers
    parts = map_jobs(digest_matrix, jobs, workers=workers, desc="dedup: minhash")
    return np.concatenate(parts) if parts else np.zeros((0, cfg.num_perm), dtype=np.uint32)


class SignatureColumns:
    """The signatures of n documents on disk, written once and read a band at a time.

    Two files: `columns` holds them permutation by permutation ((num_perm, n) uint32), so a band (the `rows`
    permutations LSH compares) or one permutation of every document is one contiguous read; `rows` holds them
    document by document ((n, num_perm)), for the kept documents' signatures dedup saves. Memory follows
    n * rows while a band is read, never n * num_perm.
    """

    def __init__(self, folder: Path, n: int, num_perm: int) -> None:
        self.n, self.num_perm = n, num_perm
        self.columns_file, self.rows_file = Path(folder) / "columns.u32", Path(folder) / "rows.u32"
        Path(folder).mkdir(parents=True, exist_ok=True)
        for path in (self.columns_file, self.rows_file):
            with open(path, "wb") as f:
                f.truncate(n * num_perm * 4)

    def __len__(self) -> int:
        return self.n

    def write(self, start: int, sigs: np.ndarray) -> None:
        """Store the signatures of documents start .. start + len(sigs)."""
        sigs = np.ascontiguousarray(sigs, dtype=np.uint32)
        with open(self.rows_file, "r+b") as f:
            os.pwrite(f.fileno(), sigs.tobytes(), start * self.num_perm * 4)
        by_perm = np.ascontiguousarray(sigs.T)
        with open(self.columns_file, "r+b") as f:
            for perm in range(self.num_perm):
                os.pwrite(f.fileno(), by_perm[perm].tobytes(), (perm * self.n + start) * 4)

    def columns(self, lo: int, hi: int) -> np.ndarray:
        """Permutations lo .. hi of every document, as an (n, hi - lo) view."""
        data = np.fromfile(self.columns_file, dtype=np.uint32, count=(hi - lo) * self.n, offset=lo * self.n * 4)
        return data.reshape(hi - lo, self.n).T

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The signatures of documents start .. stop, as a (stop - start, num_perm) array."""
        data = np.fromfile(self.rows_file, dtype=np.uint32, count=(stop - start) * self.num_perm, offset=start * self.num_perm * 4)
        return data.reshape(stop - start, self.num_perm)

    def similarity(self, pairs: np.ndarray) -> np.ndarray:
        """Estimated Jaccard of each pair, counted one permutation at a time (the same values `similarity` gives)."""
        out = np.empty(len(pairs), dtype=np.float64)
        for start in range(0, len(pairs), VERIFY_COLUMN_PAIRS):
            chunk = pairs[start : start + VERIFY_COLUMN_PAIRS]
            equal = np.zeros(len(chunk), dtype=np.int32)
            for perm in range(self.num_perm):
                values = self.columns(perm, perm + 1)[:, 0]
                equal += values[chunk[:, 0]] == values[chunk[:, 1]]
            out[start : start + len(chunk)] = equal / self.num_perm
        return out


Signatures = np.ndarray | SignatureColumns


@dataclass
class DocIndex:
    """What dedup needs of each document, without its text: exact keys, signatures, shingles present, size (and the
    ids, for an in-memory list of texts)."""

    keys: np.ndarray  # (n,) S32: sha256 of the normalized text
    sigs: Signatures  # (n, num_perm) uint32, in memory or on disk
    has_shingles: np.ndarray  # (n,) bool: documents without words are never near duplicates
    text_bytes: np.ndarray  # (n,) int64

    @classmethod
    def of_texts(cls, cfg: DedupConfig, texts: list[str], sigs: np.ndarray | None = None) -> DocIndex:
        keyed = cls.keyed(texts)
        keyed.sigs = signatures(cfg, texts) if sigs is None else sigs
        return keyed

    @classmethod
    def keyed(cls, texts: list[str]) -> DocIndex:
        """Everything but the signatures (left empty)."""
        return cls(
            keys=np.array([exact_key(t) for t in texts], dtype="S32"),
            sigs=np.zeros((0, 0), np.uint32),
            has_shingles=np.array([has_words(t) for t in texts], dtype=bool),
            text_bytes=np.array([len(t.encode("utf-8", "surrogatepass")) for t in texts], dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: list[DocIndex]) -> DocIndex:
        """The parts' keys, shingle flags and sizes, in order (signatures are added afterwards)."""
        if not parts:
            return cls(np.zeros(0, "S32"), np.zeros((0, 0), np.uint32), np.zeros(0, bool), np.zeros(0, np.int64))
        return cls(
            keys=np.concatenate([p.keys for p in parts]),
            sigs=np.zeros((0, 0), np.uint32),
            has_shingles=np.concatenate([p.has_shingles for p in parts]),
            text_bytes=np.concatenate([p.text_bytes for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.keys)


def _shard_keys(shard: Path) -> DocIndex:
    """Pass 1 on one shard (in a worker): exact keys, shingles present, sizes; no signatures yet."""
    import pyarrow.parquet as pq

    batches = pq.ParquetFile(shard).iter_batches(batch_size=SHARD_BATCH_DOCS, columns=["text"])
    keyed = DocIndex.concat([DocIndex.keyed(b.column("text").to_pylist()) for b in batches])
    release_free_memory()  # what the shard's text took, given back before the worker's next job (see _shard_signatures)
    return keyed


def _shard_signatures(shard: Path, wanted: np.ndarray, engine: str, shingle_words: int, num_perm: int, seed: int) -> np.ndarray:
    """Pass 2 on one shard (in a worker): signatures of the rows in `wanted` (a bool mask), zeros elsewhere."""
    import pyarrow.parquet as pq

    sigs = np.zeros((len(wanted), num_perm), dtype=np.uint32)
    start = 0
    for batch in pq.ParquetFile(shard).iter_batches(batch_size=SHARD_BATCH_DOCS, columns=["text"]):
        rows = np.flatnonzero(wanted[start : start + batch.num_rows])
        if len(rows):
            texts = batch.column("text") if len(rows) == batch.num_rows else batch.column("text").take(rows)
            sigs[start + rows] = digest_matrix(engine, texts, shingle_words, num_perm, seed)
        start += batch.num_rows
    # A job's own allocations peak near 10 MB (tracemalloc) besides the shard's Arrow buffers, but glibc's heap and
    # Arrow's pool kept ~90 MB freed per worker after a few shards, and more the more shards a worker had done: at
    # 5 GB that retained memory, not the work, made the stage's peak. Given back at the end of every job.
    release_free_memory()
    return sigs


def index_shards(cfg: DedupConfig, shards: list[Path], scratch: Path) -> tuple[DocIndex, np.ndarray]:
    """The DocIndex of every shard, in order, and each shard's first position (plus the total), built shard by shard
    as engine jobs (cfg.workers local processes, or Ray). Signatures are computed only for documents that can be
    near duplicates (the first of their exact key, with words; the others get zeros) and go to SignatureColumns
    files in `scratch` as each shard's job returns, so memory holds about 50 bytes per document, not the signatures."""
    parts = map_jobs(_shard_keys, [(s,) for s in shards], workers=cfg.workers, desc="dedup: exact keys")
    offsets = np.cumsum([0] + [len(p) for p in parts])
    index = DocIndex.concat(parts)
    del parts
    n = len(index)
    wanted = (exact_firsts(index.keys) == np.arange(n)) & index.has_shingles
    jobs = [(s, wanted[offsets[k] : offsets[k + 1]], cfg.engine, cfg.shingle_words, cfg.num_perm, cfg.seed) for k, s in enumerate(shards)]
    store = SignatureColumns(scratch, n, cfg.num_perm)
    for start, sigs in zip(offsets, imap_jobs(_shard_signatures, jobs, workers=cfg.workers, desc="dedup: minhash"), strict=False):
        store.write(int(start), sigs)
    index.sigs = store
    return index, offsets


def exact_firsts(keys: np.ndarray) -> np.ndarray:
    """For each position, the position of the first document with the same exact key (itself when it is the first)."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


def band_pair_chunks(sigs: Signatures, positions: np.ndarray, band: int, rows: int) -> Iterator[np.ndarray]:
    """(i, j) positions, i < j, of documents in `positions` whose signatures agree on band `band` (a sort by band key),
    in chunks of about CANDIDATE_CHUNK_PAIRS pairs (a bucket's pairs are never split), so the candidates of a band
    with large buckets are never all in memory at once."""
    lo, hi = band * rows, (band + 1) * rows
    block = sigs.columns(lo, hi) if isinstance(sigs, SignatureColumns) else sigs[:, lo:hi]
    slices = np.ascontiguousarray(block[positions]).view(np.dtype((np.void, rows * 4))).reshape(-1)
    del block
    order = np.argsort(slices, kind="stable")
    ordered = slices[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    del slices, ordered
    found, size = [], 0
    for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
        members = np.sort(positions[order[start:end]])
        i, j = np.triu_indices(len(members), k=1)
        found.append(np.stack([members[i], members[j]], axis=1).astype(np.int64))
        size += len(i)
        if size >= CANDIDATE_CHUNK_PAIRS:
            yield np.concatenate(found)
            found, size = [], 0
    if found:
        yield np.concatenate(found)


def similarity(sigs: Signatures, pairs: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of each pair: the share of equal signature values."""
    if isinstance(sigs, SignatureColumns):
        return sigs.similarity(pairs)
    out = np.empty(len(pairs), dtype=np.float64)
    for start in range(0, len(pairs), VERIFY_CHUNK_PAIRS):
        chunk = pairs[start : start + VERIFY_CHUNK_PAIRS]
        out[start : start + len(chunk)] = (sigs[chunk[:, 0]] == sigs[chunk[:, 1]]).mean(axis=1)
    return out


def near_duplicate_pairs(cfg: DedupConfig, sigs: Signatures, positions: np.ndarray) -> np.ndarray:
    """Verified near-duplicate pairs (i, j), i < j, among `positions`, ordered by (i, j).

    Band by band, a chunk of candidates at a time, the candidates not verified yet are verified and only the
    verified pairs are kept (as one int64 code i * n + j each, in sorted runs), so memory follows the verified pairs
    and one chunk of candidates, not every candidate of every band; the result is the same as verifying the union
    of all bands' candidates."""
    bands = lsh_bands(cfg.threshold, cfg.num_perm)
    rows, n = cfg.num_perm // bands, max(len(sigs), 1)
    verified: list[np.ndarray] = []  # sorted, disjoint runs of codes
    for band in range(bands):
        for pairs in band_pair_chunks(sigs, positions, band, rows):
            codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
            del pairs
            for run in verified:
                at = np.searchsorted(run, codes).clip(max=len(run) - 1)
                codes = codes[run[at] != codes]
            if len(codes):
                sims = similarity(sigs, np.stack([codes // n, codes % n], axis=1))
                if (sims >= cfg.threshold).any():
                    verified.append(codes[sims >= cfg.threshold])
        verified = [np.sort(np.concatenate(verified))] if len(verified) > 1 else verified  # one run per band
    codes = verified[0] if verified else np.zeros(0, dtype=np.int64)
    return np.stack([codes // n, codes % n], axis=1)


def clusters_keep_first(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the pairs over n positions; each position maps to its component's lowest position."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    lowest = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(lowest, labels, np.arange(n, dtype=np.int64))
    return lowest[labels]


@dataclass
class Removed:
    """The documents dedup drops, by ascending position: the kept document in each one's place, whether it is a near
    (not exact) duplicate, and its estimated Jaccard to the kept one (1.0 for an exact duplicate)."""

    positions: np.ndarray  # int64
    kept: np.ndarray  # int64, an earlier position: the first with the same text (which may itself be a near duplicate) or the cluster's first
    near: np.ndarray  # bool
    similarity: np.ndarray  # float64

    def as_dict(self) -> dict[int, tuple[int, str, float]]:
        return {
            int(p): (int(k), "near" if n else "exact", float(s))
            for p, k, n, s in zip(self.positions, self.kept, self.near, self.similarity, strict=True)
        }


def find_duplicates_in(cfg: DedupConfig, index: DocIndex) -> Removed:
    """Exact duplicates (each mapped to the first with its key), then near-duplicate clusters among the rest (each
    mapped to its cluster's first document)."""
    n = len(index)
    firsts = exact_firsts(index.keys)
    exact = np.flatnonzero(firsts != np.arange(n))
    survivors = np.flatnonzero((firsts == np.arange(n)) & index.has_shingles)
    pairs = near_duplicate_pairs(cfg, index.sigs, survivors)
    roots = clusters_keep_first(n, pairs)
    near = np.flatnonzero(roots != np.arange(n))  # never an exact duplicate: those are in no pair
    near_sims = similarity(index.sigs, np.stack([near, roots[near]], axis=1)) if len(near) else np.zeros(0)
    positions = np.concatenate([exact, near])
    order = np.argsort(positions, kind="stable")
    return Removed(
        positions=positions[order],
        kept=np.concatenate([firsts[exact], roots[near]])[order],
        near=np.concatenate([np.zeros(len(exact), bool), np.ones(len(near), bool)])[order],
        similarity=np.concatenate([np.ones(len(exact)), near_sims])[order],
    )


SIGNATURES_FILE, SIGNATURES_META = "minhash.npy", "minhash.json"  # in data/dedup/: the kept documents' signatures


def signature_settings(cfg: DedupConfig) -> dict[str, object]:
    """What makes two signature matrices comparable."""
    return {"engine": cfg.engine, "num_perm": cfg.num_perm, "seed": cfg.seed, "shingle_words": cfg.shingle_words, "shingles": SHINGLE_FORMAT}


def load_signatures(dedup_dir: Path, cfg: DedupConfig, rows: int) -> np.ndarray | None:
    """The kept documents' signatures dedup saved, or None when absent or made with other settings or rows."""
    import json

    meta_file, sigs_file = Path(dedup_dir) / SIGNATURES_META, Path(dedup_dir) / SIGNATURES_FILE
    if not meta_file.exists() or not sigs_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    if {k: meta.get(k) for k in signature_settings(cfg)} != signature_settings(cfg) or meta.get("rows") != rows:
        return None
    sigs = np.load(sigs_file, mmap_mode="r")
    return sigs if sigs.shape == (rows, cfg.num_perm) else None


def find_duplicates(cfg: DedupConfig, texts: list[str]) -> dict[int, tuple[int, str, float]]:
    """find_duplicates_in for an in-memory list of texts."""
    return find_duplicates_in(cfg, DocIndex.of_texts(cfg, texts)).as_dict()
