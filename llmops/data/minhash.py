"""Exact (normalized text) and near-duplicate (MinHash LSH, verified by estimated Jaccard) detection: shingles,
signatures across worker processes, LSH candidate pairs, clusters. The dedup stage and the drift monitor use it."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from llmops.params.dedup import DedupConfig
from llmops.common.progress import progress

SIGNATURE_CHUNK_DOCS = 64


def normalize(text: str) -> str:
    """Text as compared for exact duplicates: trailing whitespace and blank edges do not count."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def exact_key(text: str) -> str:
    return hashlib.sha256(normalize(text).encode("utf-8", "surrogatepass")).hexdigest()


def word_shingles(text: str, n: int) -> list[str]:
    """Distinct word n-grams; a document shorter than n words is one shingle."""
    words = text.split()
    if len(words) < n:
        return [" ".join(words)] if words else []
    return list({" ".join(words[i : i + n]) for i in range(len(words) - n + 1)})


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


def _signatures(engine: str, texts: list[str], shingle_words: int, num_perm: int, seed: int) -> list[Any]:
    shingle_sets = [word_shingles(t, shingle_words) for t in texts]
    if engine == "rensa":
        from rensa import RMinHash

        return RMinHash.from_token_sets(shingle_sets, num_perm=num_perm, seed=seed)
    from datasketch import LeanMinHash, MinHash

    minhashes = MinHash.bulk([[s.encode("utf-8", "surrogatepass") for s in ss] for ss in shingle_sets], num_perm=num_perm, seed=seed)
    return [LeanMinHash(m) for m in minhashes]


def signatures(cfg: DedupConfig, texts: list[str]) -> list[Any]:
    """MinHash signatures for `texts`, computed in chunks across worker processes (shingling is Python-bound)."""
    workers = cfg.workers or os.cpu_count() or 1
    chunks = [texts[i : i + SIGNATURE_CHUNK_DOCS] for i in range(0, len(texts), SIGNATURE_CHUNK_DOCS)]
    args = (cfg.engine, cfg.shingle_words, cfg.num_perm, cfg.seed)
    out: list[Any] = []
    if workers == 1 or len(chunks) <= 1:
        for chunk in progress(chunks, desc="dedup: minhash", unit="chunk"):
            out.extend(_signatures(args[0], chunk, *args[1:]))
        return out
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_signatures, args[0], chunk, *args[1:]) for chunk in chunks]
        for future in progress(futures, desc="dedup: minhash", unit="chunk"):
            out.extend(future.result())
    return out


def near_duplicate_pairs(cfg: DedupConfig, sigs: list[Any], has_shingles: list[bool]) -> list[tuple[int, int, float]]:
    """(i, j, estimated Jaccard) for LSH candidates i < j verified to be at or above the threshold."""
    bands = lsh_bands(cfg.threshold, cfg.num_perm)
    if cfg.engine == "rensa":
        from rensa import RMinHashLSH

        lsh = RMinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, num_bands=bands)
    else:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=(bands, cfg.num_perm // bands))
    for i, sig in enumerate(sigs):
        if has_shingles[i]:
            lsh.insert(i, sig)
    pairs = []
    for i, sig in enumerate(progress(sigs, desc="dedup: lsh query", unit="doc")):
        if not has_shingles[i]:
            continue
        for j in lsh.query(sig):
            if j > i:
                similarity = float(sig.jaccard(sigs[j]))
                if similarity >= cfg.threshold:
                    pairs.append((i, j, similarity))
    return pairs


def clusters_keep_first(n: int, pairs: list[tuple[int, int, float]]) -> list[int]:
    """Union-find over verified pairs; each record maps to its cluster's lowest index (the one kept)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return [find(i) for i in range(n)]


def find_duplicates(cfg: DedupConfig, texts: list[str]) -> dict[int, tuple[int, str, float]]:
    """Map each removed position -> (kept position, 'exact' | 'near', similarity to the kept record)."""
    removed: dict[int, tuple[int, str, float]] = {}
    first_by_key: dict[str, int] = {}
    for i, text in enumerate(texts):
        kept = first_by_key.setdefault(exact_key(text), i)
        if kept != i:
            removed[i] = (kept, "exact", 1.0)
    survivors = [i for i in range(len(texts)) if i not in removed]
    survivor_texts = [texts[i] for i in survivors]
    sigs = signatures(cfg, survivor_texts)
    has_shingles = [bool(t.split()) for t in survivor_texts]
    pairs = near_duplicate_pairs(cfg, sigs, has_shingles)
    roots = clusters_keep_first(len(survivors), pairs)
    for local, root in enumerate(roots):
        if root != local:
            removed[survivors[local]] = (survivors[root], "near", float(sigs[local].jaccard(sigs[root])))
    return removed
