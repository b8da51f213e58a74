"""dedup: drop exact duplicates (normalized text) and near duplicates (MinHash LSH) from data/validated/.

Writes the kept records to data/dedup/ and every removed record, with the id of the record
kept in its place, the kind (exact/near) and the estimated Jaccard similarity, to
data/duplicates/ (the cluster report): nothing is lost, and in = kept + duplicates.

Shards stream through. The index pass runs per shard as engine jobs (exact keys, then MinHash signatures of the
documents that can be near duplicates; no text is kept); the signatures go to files on disk as each shard's job
returns (llmops.data.minhash.SignatureColumns, in a scratch folder of the output removed before it is renamed into
place). The LSH reads them a band at a time, verifies candidates, and clusters the verified pairs; the filter
pass then splits each shard into kept and removed records through shard writers. Memory holds about 50 bytes per
document (exact key, size, flags) and one shard, never the corpus or its signatures. The signatures of the kept
documents are written beside them (minhash.npy + minhash.json) for anything that later asks "is this near a
training document?".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmops.common.io import RECORD_SCHEMA, ShardWriter, atomic_dir, atomic_write_bytes, read_shard, record_shards, release_free_memory
from llmops.common.progress import progress
from llmops.common.results import StageResult
from llmops.data.minhash import (
    SIGNATURES_FILE,
    SIGNATURES_META,
    Removed,
    SignatureColumns,
    find_duplicates_in,
    index_shards,
    lsh_bands,
    signature_settings,
)
from llmops.params.dedup import DedupConfig
from llmops.params.paths import PathsConfig

REPORT_SCHEMA = RECORD_SCHEMA.append(pa.field("duplicate_of", pa.string())).append(pa.field("kind", pa.string())).append(pa.field("similarity", pa.float64()))


def run(cfg: DedupConfig, paths: PathsConfig) -> StageResult:
    shards = record_shards(paths.validated)
    with atomic_dir(paths.duplicates) as report_tmp, atomic_dir(paths.dedup) as kept_tmp:
        scratch = kept_tmp / ".index"  # the signatures on disk while the stage runs; removed before the rename
        index, offsets = index_shards(cfg, shards, scratch)
        removed = find_duplicates_in(cfg, index)
        release_free_memory()  # the LSH's temporaries, before the filter pass
        n = len(index)
        keep = np.ones(n, dtype=bool)
        keep[removed.positions] = False
        kept_ids = _write_split(cfg, shards, offsets, removed, kept_tmp, report_tmp)
        _write_kept_signatures(index.sigs, offsets, keep, kept_tmp / SIGNATURES_FILE)
        meta = {**signature_settings(cfg), "rows": int(keep.sum())}
        atomic_write_bytes(kept_tmp / SIGNATURES_META, (json.dumps(meta, sort_keys=True) + "\n").encode())
        shutil.rmtree(scratch)
    exact = int((~removed.near).sum())
    bytes_removed = int(index.text_bytes[~keep].sum())
    metrics = {
        "docs_in": n,
        "docs_out": kept_ids,
        "exact_duplicates": exact,
        "near_duplicates": len(removed.positions) - exact,
        "near_duplicate_clusters": len(np.unique(removed.kept[removed.near])),
        "bytes_in": int(index.text_bytes.sum()),
        "bytes_removed": bytes_removed,
        "engine": cfg.engine,
        "lsh_bands": lsh_bands(cfg.threshold, cfg.num_perm),
    }
    summary = (
        f"dedup: {n} records -> {metrics['docs_out']} kept at {paths.dedup}; removed {exact} exact + "
        f"{metrics['near_duplicates']} near duplicates ({bytes_removed / 1e6:.2f} MB), report at {paths.duplicates}"
    )
    return StageResult(metrics=metrics, summary=summary, facts=("lsh_bands",))


def _write_split(cfg: DedupConfig, shards: list[Path], offsets: np.ndarray, removed: Removed, kept_dir: Path, report_dir: Path) -> int:
    """The filter pass: each shard's records go to the kept shards or, with the id of the record kept in their place,
    to the report, as Arrow tables (no Python object per record). The record named in a duplicate's place always
    comes before it (it may itself be a near duplicate of an earlier one: an exact duplicate names the first with its
    text), so the ids needed are collected on the way (one per cluster). Returns the number of records kept."""
    kept = ShardWriter(kept_dir, shard_max_bytes=cfg.shard_max_bytes)
    report = ShardWriter(report_dir, shard_max_bytes=cfg.shard_max_bytes, schema=REPORT_SCHEMA)
    targets = np.unique(removed.kept)
    ids_of: dict[int, str] = {}
    for k, shard in enumerate(progress(shards, desc="dedup: writing", unit="shard")):
        start, stop = int(offsets[k]), int(offsets[k + 1])
        table = read_shard(shard)
        named = targets[np.searchsorted(targets, start) : np.searchsorted(targets, stop)]
        ids_of.update(zip(named.tolist(), table.column("id").take(pa.array(named - start)).to_pylist(), strict=True))
        lo, hi = np.searchsorted(removed.positions, [start, stop])
        gone = removed.positions[lo:hi] - start
        keep = np.ones(stop - start, dtype=bool)
        keep[gone] = False
        kept.add_table(table.filter(pa.array(keep)))
        if len(gone):
            duplicates = (
                table.take(pa.array(gone))
                .append_column("duplicate_of", pa.array([ids_of[int(p)] for p in removed.kept[lo:hi]], pa.string()))
                .append_column("kind", pa.array(np.where(removed.near[lo:hi], "near", "exact").tolist(), pa.string()))
                .append_column("similarity", pa.array(removed.similarity[lo:hi], pa.float64()))
            )
            report.add_table(duplicates)
        del table
        release_free_memory()
    kept.close()
    report.close()
    return kept.rows


def _write_kept_signatures(sigs: SignatureColumns, offsets: np.ndarray, keep: np.ndarray, path: Path) -> None:
    """The kept documents' signatures as one .npy (the bytes np.save writes), shard by shard from the store."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint32)), "fortran_order": False, "shape": (int(keep.sum()), sigs.num_perm)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
            f.write(sigs.rows(int(start), int(stop))[keep[start:stop]].tobytes())
