"""dedup: drop exact duplicates (normalized text) and near duplicates (MinHash LSH) from data/validated/.

Writes the kept records to data/dedup/ and every removed record, with the id of the record
kept in its place, the kind (exact/near) and the estimated Jaccard similarity, to
data/duplicates/ (the cluster report): nothing is lost, and in = kept + duplicates.
"""

from __future__ import annotations

import pyarrow as pa

from llmops.common.io import atomic_dir, read_records, write_records
from llmops.common.results import StageResult
from llmops.data.minhash import find_duplicates, lsh_bands
from llmops.params.dedup import DedupConfig
from llmops.params.paths import PathsConfig


def run(cfg: DedupConfig, paths: PathsConfig) -> StageResult:
    table = read_records(paths.validated)
    texts = table.column("text").to_pylist()
    removed = find_duplicates(cfg, texts)
    ids = table.column("id").to_pylist()
    keep_mask = pa.array([i not in removed for i in range(table.num_rows)])
    kept = table.filter(keep_mask)
    order = sorted(removed)
    report = table.take(pa.array(order, type=pa.int64()))
    report = (
        report.append_column("duplicate_of", pa.array([ids[removed[i][0]] for i in order], type=pa.string()))
        .append_column("kind", pa.array([removed[i][1] for i in order], type=pa.string()))
        .append_column("similarity", pa.array([removed[i][2] for i in order], type=pa.float64()))
    )
    with atomic_dir(paths.duplicates) as tmp:
        write_records(tmp, report, shard_max_bytes=cfg.shard_max_bytes)
    with atomic_dir(paths.dedup) as tmp:
        write_records(tmp, kept, shard_max_bytes=cfg.shard_max_bytes)
    exact = sum(1 for v in removed.values() if v[1] == "exact")
    bytes_removed = sum(len(texts[i].encode("utf-8", "surrogatepass")) for i in removed)
    bytes_in = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    metrics = {
        "docs_in": table.num_rows,
        "docs_out": kept.num_rows,
        "exact_duplicates": exact,
        "near_duplicates": len(removed) - exact,
        "near_duplicate_clusters": len({removed[i][0] for i in removed if removed[i][1] == "near"}),
        "bytes_in": bytes_in,
        "bytes_removed": bytes_removed,
        "engine": cfg.engine,
        "lsh_bands": lsh_bands(cfg.threshold, cfg.num_perm),
    }
    summary = (
        f"dedup: {table.num_rows} records -> {kept.num_rows} kept at {paths.dedup}; removed {exact} exact + "
        f"{metrics['near_duplicates']} near duplicates ({bytes_removed / 1e6:.2f} MB), report at {paths.duplicates}"
    )
    return StageResult(metrics=metrics, summary=summary)
