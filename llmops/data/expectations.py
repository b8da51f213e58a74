"""The data contract: a Great Expectations suite over a per-record profile, Data Docs, and the split of records into
valid and quarantined (each with the expectations it failed). The validate stage and the drift monitor both run it.

The expectations run on a per-record profile (length, longest line, NUL and control-char
counts, alphanumeric ratio, ingest error, id), so each rule is a declared GX expectation and
the Data Docs stay small even when a record is a 5 MB single line. A record that fails any
expectation goes to quarantine with the names of the expectations it failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from llmops.common.io import RECORD_SCHEMA, ShardWriter, atomic_dir
from llmops.common.progress import progress
from llmops.data.engine import map_jobs
from llmops.params.validate import ValidateConfig

# Control characters that do not belong in text or code (tab, newline, CR and form feed do).
CONTROL_CHARS_RE = "[\x01-\x08\x0b\x0e-\x1f\x7f]"


def profile_records(table: pa.Table) -> pd.DataFrame:
    """One row per record with the measurements the expectations check."""
    text = table.column("text")
    chars = pc.utf8_length(text)
    safe_chars = pc.max_element_wise(pc.fill_null(chars, 0), 1)
    longest_line = [max(map(len, t.split("\n"))) if t is not None else None for t in text.to_pylist()]
    return pd.DataFrame(
        {
            "id": table.column("id").to_pandas(),
            "text_chars": chars.to_pandas().astype("Int64"),
            "max_line_chars": pd.array(longest_line, dtype="Int64"),
            "nul_chars": pc.count_substring(text, "\x00").to_pandas().astype("Int64"),
            "control_char_ratio": pc.divide(pc.cast(pc.count_substring_regex(text, CONTROL_CHARS_RE), pa.float64()), safe_chars).to_pandas(),
            "alnum_ratio": pc.divide(pc.cast(pc.count_substring_regex(text, r"[\p{L}\p{N}]"), pa.float64()), safe_chars).to_pandas(),
            "ingest_error": table.column("ingest_error").to_pandas(),
        }
    )


def profile_shard(shard: Path) -> pd.DataFrame:
    """profile_records of one Parquet shard (an engine job)."""
    import pyarrow.parquet as pq

    return profile_records(pq.read_table(shard, columns=["id", "text", "ingest_error"]))


def build_suite(cfg: ValidateConfig) -> list[Any]:
    """The data contract. Length/ratio expectations skip nulls, so not-null checks come first."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToNotBeNull(column="text_chars"),
        gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=cfg.min_chars, max_value=cfg.max_chars),
        gxe.ExpectColumnValuesToBeBetween(column="max_line_chars", max_value=cfg.max_line_chars),
        gxe.ExpectColumnValuesToBeBetween(column="nul_chars", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToBeBetween(column="control_char_ratio", max_value=cfg.max_control_char_ratio),
        gxe.ExpectColumnValuesToBeBetween(column="alnum_ratio", min_value=cfg.min_alnum_ratio),
        gxe.ExpectColumnValuesToBeNull(column="ingest_error"),
    ]


def expectation_name(config: Any) -> str:
    """'expect_column_values_to_be_between(text_chars, min_value=1, max_value=2000000)'."""
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("column", "batch_id") and v is not None}
    kwargs = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in kwargs.items()}
    args = ([config.kwargs["column"]] if "column" in config.kwargs else []) + [f"{k}={v}" for k, v in sorted(kwargs.items())]
    return f"{config.type}({', '.join(map(str, args))})"


def run_suite(profile: pd.DataFrame, cfg: ValidateConfig, docs_dir: Path) -> tuple[list[dict[str, Any]], dict[int, list[str]]]:
    """Run the suite through a GX checkpoint that also builds Data Docs into `docs_dir`.

    Returns per-expectation results and, per failing row position, the expectations it failed.
    """
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.add_data_docs_site(
        site_name="llmops",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    batch = context.data_sources.add_pandas("corpus").add_dataframe_asset("records").add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name="records"))
    for expectation in build_suite(cfg):
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name="records"))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="validate",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE", "partial_unexpected_count": 20},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": profile})
    rows = len(profile)
    per_expectation: list[dict[str, Any]] = []
    failures: dict[int, list[str]] = {}
    for run_result in result.run_results.values():
        for er in run_result.results:
            name = expectation_name(er.expectation_config)
            bad = er.result.get("unexpected_index_list") or []
            positions = [int(i) for i in bad]
            for pos in positions:
                failures.setdefault(pos, []).append(name)
            failed_rows = len(positions) if positions else (0 if er.success else rows)
            per_expectation.append(
                {"expectation": name, "success": bool(er.success), "failed_rows": failed_rows, "pass_rate": 1 - failed_rows / rows if rows else 0.0}
            )
    return per_expectation, failures


def split_by_failures(table: pa.Table, failures: dict[int, list[str]]) -> tuple[pa.Table, pa.Table]:
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[list(failures)] = True
    validated = table.filter(pa.array(~mask))
    positions = np.flatnonzero(mask)
    quarantined = table.take(pa.array(positions, type=pa.int64())).append_column(
        "failed_expectations", pa.array([json.dumps(failures[int(p)]) for p in positions], type=pa.string())
    )
    return validated, quarantined


QUARANTINE_SCHEMA = RECORD_SCHEMA.append(pa.field("failed_expectations", pa.string()))


def validate_shards(
    shards: list[Path], cfg: ValidateConfig, docs_dir: Path, valid_dir: Path, quarantine_dir: Path
) -> tuple[int, int, list[dict[str, Any]]]:
    """The suite over every record of `shards`, streamed: (records in, quarantined, per-expectation results).

    Two passes over the shards. The first profiles one shard at a time; the suite then runs once on the profile of
    the whole corpus (a few numbers per record, ~1-2% of the text), so Data Docs, per-expectation counts and the
    uniqueness of ids cover the whole corpus. The second pass splits each shard into `valid_dir` and
    `quarantine_dir` (each record that failed carries the names of what it failed) through shard writers: memory
    holds the profile and one shard, never the corpus. The output directories must be temp directories (atomic_dir).
    """
    import pyarrow.parquet as pq

    profiles = map_jobs(profile_shard, [(shard,) for shard in shards], workers=cfg.workers, desc="validate: profiling")
    profile = pd.concat(profiles, ignore_index=True) if profiles else profile_records(RECORD_SCHEMA.empty_table())
    with atomic_dir(Path(docs_dir)) as docs_tmp:
        per_expectation, failures = run_suite(profile, cfg, docs_tmp)
    valid = ShardWriter(valid_dir, shard_max_bytes=cfg.shard_max_bytes)
    quarantine = ShardWriter(quarantine_dir, shard_max_bytes=cfg.shard_max_bytes, schema=QUARANTINE_SCHEMA)
    offset = 0
    for shard in progress(shards, desc="validate: splitting", unit="shard"):
        table = pq.read_table(shard)
        for position, row in enumerate(table.to_pylist(), start=offset):
            if position in failures:
                quarantine.add(row | {"failed_expectations": json.dumps(failures[position])})
            else:
                valid.add(row)
        offset += table.num_rows
    valid.close()
    quarantine.close()
    return len(profile), quarantine.rows, per_expectation


def validate_records(table: pa.Table, cfg: ValidateConfig, docs_dir: Path) -> tuple[pa.Table, pa.Table, list[dict[str, Any]]]:
    """Run the suite on `table` (Data Docs written to `docs_dir` in one rename): (valid, quarantined, per-expectation results)."""
    profile = profile_records(table)
    with atomic_dir(Path(docs_dir)) as docs_tmp:
        per_expectation, failures = run_suite(profile, cfg, docs_tmp)
    validated, quarantined = split_by_failures(table, failures)
    return validated, quarantined, per_expectation
