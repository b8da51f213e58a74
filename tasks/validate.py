"""validate: the Great Expectations data contract on data/raw; writes data/validated/, data/quarantine/ (each
rejected record with the expectations it failed) and Data Docs. Fails under `validate.min_pass_rate`."""

from __future__ import annotations

from llmops.common.errors import DataError
from llmops.common.io import atomic_dir, read_records, write_records
from llmops.common.results import StageResult
from llmops.data.expectations import validate_records
from llmops.params.paths import PathsConfig
from llmops.params.validate import ValidateConfig


def run(cfg: ValidateConfig, paths: PathsConfig) -> StageResult:
    docs_dir = paths.reports / "validate" / "data_docs"
    table = read_records(paths.raw)
    validated, quarantined, per_expectation = validate_records(table, cfg, docs_dir)
    with atomic_dir(paths.quarantine) as tmp:
        write_records(tmp, quarantined, shard_max_bytes=cfg.shard_max_bytes)
    pass_rate = validated.num_rows / table.num_rows
    metrics = {
        "docs_in": table.num_rows,
        "docs_out": validated.num_rows,
        "quarantined": quarantined.num_rows,
        "pass_rate": pass_rate,
        "pass_rate_by_expectation": {e["expectation"]: e["pass_rate"] for e in per_expectation},
        "failed_rows_by_expectation": {e["expectation"]: e["failed_rows"] for e in per_expectation},
    }
    if pass_rate < cfg.min_pass_rate:
        worst = sorted(per_expectation, key=lambda e: e["pass_rate"])[:3]
        detail = "; ".join(f"{e['expectation']}: {e['failed_rows']} row(s) failed" for e in worst if e["failed_rows"])
        raise DataError(
            f"validate: pass rate {pass_rate:.2%} is under validate.min_pass_rate {cfg.min_pass_rate:.2%} "
            f"({quarantined.num_rows} of {table.num_rows} records failed). Worst: {detail}. "
            f"Rejected rows with reasons: {paths.quarantine}; Data Docs: {docs_dir}/index.html"
        )
    with atomic_dir(paths.validated) as tmp:
        write_records(tmp, validated, shard_max_bytes=cfg.shard_max_bytes)
    summary = (
        f"validate: {table.num_rows} records -> {validated.num_rows} valid ({pass_rate:.2%}) at {paths.validated}, "
        f"{quarantined.num_rows} quarantined at {paths.quarantine}; Data Docs at {docs_dir}/index.html"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=[docs_dir])
