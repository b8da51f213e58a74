"""dedup: drop exact duplicates (normalized text) and near duplicates (MinHash LSH) from data/validated/.

Writes the kept records to data/dedup/ and every removed record, with the id of the record
kept in its place, the kind (exact/near) and the estimated Jaccard similarity, to
data/duplicates/ (the cluster report): nothing is lost, and in = kept + duplicates.

Shards stream through in two passes: the first indexes each shard in a worker process (ids, exact keys, MinHash
signatures; no text is kept), the LSH and the clusters run on that index, and the second pass splits each shard
into kept and removed records through shard writers. Memory holds the index (about num_perm * 4 bytes per
document) and one shard, never the corpus. The signatures of the kept documents are written beside them
(minhash.npy + minhash.json) for anything that later asks "is this near a training document?".
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmops.common.io import RECORD_SCHEMA, ShardWriter, atomic_dir, atomic_write_bytes, record_shards
from llmops.common.progress import progress
from llmops.common.results import StageResult
from llmops.data.minhash import SIGNATURES_FILE, SIGNATURES_META, find_duplicates_in, index_shards, lsh_bands, signature_settings
from llmops.params.dedup import DedupConfig
from llmops.params.paths import PathsConfig

REPORT_SCHEMA = RECORD_SCHEMA.append(pa.field("duplicate_of", pa.string())).append(pa.field("kind", pa.string())).append(pa.field("similarity", pa.float64()))


def run(cfg: DedupConfig, paths: PathsConfig) -> StageResult:
    shards = record_shards(paths.validated)
    index = index_shards(cfg, shards)
    removed = find_duplicates_in(cfg, index)
    n = len(index.ids)
    with atomic_dir(paths.duplicates) as report_tmp, atomic_dir(paths.dedup) as kept_tmp:
        kept = ShardWriter(kept_tmp, shard_max_bytes=cfg.shard_max_bytes)
        report = ShardWriter(report_tmp, shard_max_bytes=cfg.shard_max_bytes, schema=REPORT_SCHEMA)
        position = 0
        for shard in progress(shards, desc="dedup: writing", unit="shard"):
            for row in pq.read_table(shard).to_pylist():
                if position in removed:
                    first, kind, sim = removed[position]
                    report.add(row | {"duplicate_of": index.ids[first], "kind": kind, "similarity": sim})
                else:
                    kept.add(row)
                position += 1
        kept.close()
        report.close()
        keep = np.ones(n, dtype=bool)
        keep[list(removed)] = False
        with open(kept_tmp / SIGNATURES_FILE, "wb") as f:
            np.save(f, index.sigs[keep])
        meta = {**signature_settings(cfg), "rows": int(keep.sum())}
        atomic_write_bytes(kept_tmp / SIGNATURES_META, (json.dumps(meta, sort_keys=True) + "\n").encode())
    exact = sum(1 for v in removed.values() if v[1] == "exact")
    bytes_removed = int(index.text_bytes[~keep].sum())
    metrics = {
        "docs_in": n,
        "docs_out": int(keep.sum()),
        "exact_duplicates": exact,
        "near_duplicates": len(removed) - exact,
        "near_duplicate_clusters": len({v[0] for v in removed.values() if v[1] == "near"}),
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
