"""The data contract: a Great Expectations suite over a per-record profile, offline Data Docs, and the split of records
into valid and quarantined (each with the rules it failed). The validate stage and the drift monitor both run it.

The expectations run on a per-record profile (length, longest line, NUL and control-char
counts, alphanumeric ratio, ingest error, id), so each rule is a declared GX expectation and
the Data Docs stay small even when a record is a 5 MB single line. Each rule has a short name
(`meta["rule"]`): the quarantine reason starts with it and the stage's metric keys use it. A record
that fails any rule goes to quarantine, by design: the rules hold when `min_pass_rate` of the
records meet them, and a second GX suite, quarantine_gate, checks the share of records that meet
every rule against `min_pass_rate`, so the Data Docs say "Succeeded" with the count quarantined.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from llmops.common import env
from llmops.common.io import RECORD_SCHEMA, ShardWriter, atomic_dir, iter_rows
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


# GX names the Data Docs show: one run of the stage validates the records against the rules, then the verdict.
DATASOURCE, RUN_NAME = "llmops", "validate"
RULES_SUITE, RULES_ASSET = "record_rules", "record_profile"
GATE_SUITE, GATE_ASSET = "quarantine_gate", "rules_failed_per_record"


def build_suite(cfg: ValidateConfig) -> list[Any]:
    """The data contract: one expectation per rule, named by `meta["rule"]` (the quarantine reason and metric key).

    A record that breaks a rule is quarantined, not fatal: each per-record rule holds when at least
    `min_pass_rate` of the records meet it (GX's `mostly`), and the stage's gate on the records that meet every
    rule is the quarantine_gate suite (`gate_expectation`). Length/ratio expectations skip nulls, so not-null
    checks come first.
    """
    import great_expectations.expectations as gxe

    most = {"mostly": cfg.min_pass_rate}
    rules: list[tuple[str, str, Any]] = [
        ("has_rows", "the corpus has at least one record", gxe.ExpectTableRowCountToBeBetween(min_value=1)),
        ("id_not_null", "every record has an id", gxe.ExpectColumnValuesToNotBeNull(column="id", **most)),
        ("id_unique", "ids are unique (both records that share an id are quarantined)", gxe.ExpectColumnValuesToBeUnique(column="id", **most)),
        ("text_not_null", "every record has a text", gxe.ExpectColumnValuesToNotBeNull(column="text_chars", **most)),
        (
            "text_length",
            f"text_chars is between {cfg.min_chars:,} and {cfg.max_chars:,}",
            gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=cfg.min_chars, max_value=cfg.max_chars, **most),
        ),
        (
            "line_length",
            f"max_line_chars (the longest line) is at most {cfg.max_line_chars:,}",
            gxe.ExpectColumnValuesToBeBetween(column="max_line_chars", max_value=cfg.max_line_chars, **most),
        ),
        ("no_nul_chars", "nul_chars is 0", gxe.ExpectColumnValuesToBeBetween(column="nul_chars", min_value=0, max_value=0, **most)),
        (
            "control_char_ratio",
            f"control_char_ratio is at most {cfg.max_control_char_ratio:g}",
            gxe.ExpectColumnValuesToBeBetween(column="control_char_ratio", max_value=cfg.max_control_char_ratio, **most),
        ),
        (
            "alnum_ratio",
            f"alnum_ratio (letters and digits per char) is at least {cfg.min_alnum_ratio:g}",
            gxe.ExpectColumnValuesToBeBetween(column="alnum_ratio", min_value=cfg.min_alnum_ratio, **most),
        ),
        ("no_ingest_error", "ingest read the file (ingest_error is null)", gxe.ExpectColumnValuesToBeNull(column="ingest_error", **most)),
    ]
    share = f"{cfg.min_pass_rate:.2%}"
    for rule, what, expectation in rules:
        expectation.meta = {"rule": rule}
        tolerance = "" if rule == "has_rows" else f" (at least {share} of records; the others are quarantined)"
        expectation.description = f"{rule}: {what}{tolerance}"
    return [expectation for _, _, expectation in rules]


def gate_expectation(cfg: ValidateConfig, quarantined: int, rows: int) -> Any:
    """The stage's gate as GX sees it, on `rules_failed` per record: at least `min_pass_rate` of records fail none.

    The counts (from the rules' results) go into the description, so the Data Docs say how many were quarantined.
    """
    import great_expectations.expectations as gxe

    passed = rows - quarantined
    rate = f" ({passed / rows:.2%})" if rows else ""
    return gxe.ExpectColumnValuesToBeBetween(
        column="rules_failed",
        max_value=0,
        mostly=cfg.min_pass_rate,
        meta={"rule": "pass_rate"},
        description=(
            f"pass_rate: {passed:,} of {rows:,} records pass every rule{rate}, at least {cfg.min_pass_rate:.2%} required; "
            f"{quarantined:,} quarantined"
        ),
    )


def expectation_name(config: Any) -> str:
    """'text_length: expect_column_values_to_be_between(text_chars, max_value=2000000, min_value=1)'."""
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("column", "batch_id", "mostly") and v is not None}
    kwargs = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in kwargs.items()}
    args = ([config.kwargs["column"]] if "column" in config.kwargs else []) + [f"{k}={v}" for k, v in sorted(kwargs.items())]
    return f"{config.meta['rule']}: {config.type}({', '.join(map(str, args))})"


def _checkpoint(context: Any, name: str, suite_name: str, asset: Any, expectations: list[Any], result_format: dict[str, Any]) -> Any:
    """A checkpoint `name` that validates the whole dataframe of `asset` against a new suite of `expectations`."""
    import great_expectations as gx

    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    batch = asset.add_batch_definition_whole_dataframe("whole_corpus")
    definition = context.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=suite_name))
    return context.checkpoints.add(gx.Checkpoint(name=name, validation_definitions=[definition], result_format=result_format))


def run_suite(profile: pd.DataFrame, cfg: ValidateConfig, docs_dir: Path) -> tuple[list[dict[str, Any]], dict[int, list[str]]]:
    """Run the rules, then the quarantine gate, through GX checkpoints that build offline Data Docs into `docs_dir`.

    Returns per-rule results and, per failing row position, the rules it failed.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from llmops.data.data_docs import copy_assets, site_config

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=env.library_progress_enabled())  # GX's "Calculating Metrics" bars
    context.add_data_docs_site(site_name="llmops", site_config=site_config(docs_dir))
    source = context.data_sources.add_pandas(DATASOURCE)
    run_id = RunIdentifier(run_name=RUN_NAME)
    complete = {"result_format": "COMPLETE", "partial_unexpected_count": 20}  # every failing row's index: the quarantine
    rules = _checkpoint(context, "validate_records", RULES_SUITE, source.add_dataframe_asset(RULES_ASSET), build_suite(cfg), complete)
    result = rules.run(batch_parameters={"dataframe": profile}, run_id=run_id)
    rows = len(profile)
    per_expectation: list[dict[str, Any]] = []
    failures: dict[int, list[str]] = {}
    for run_result in result.run_results.values():
        for er in run_result.results:
            name = expectation_name(er.expectation_config)
            positions = [int(i) for i in er.result.get("unexpected_index_list") or []]
            for pos in positions:
                failures.setdefault(pos, []).append(name)
            failed_rows = len(positions) if positions else (0 if er.success else rows)
            per_expectation.append(
                {
                    "rule": er.expectation_config.meta["rule"],
                    "expectation": name,
                    "success": bool(er.success),
                    "failed_rows": failed_rows,
                    "pass_rate": 1 - failed_rows / rows if rows else 0.0,
                }
            )
    rules_failed = np.zeros(rows, dtype=np.int64)
    for pos, names in failures.items():
        rules_failed[pos] = len(names)
    gate_suite = [gate_expectation(cfg, len(failures), rows)]
    summary = {"result_format": "SUMMARY", "partial_unexpected_count": 20}
    gate = _checkpoint(context, "validate_quarantine", GATE_SUITE, source.add_dataframe_asset(GATE_ASSET), gate_suite, summary)
    gate.run(batch_parameters={"dataframe": pd.DataFrame({"rules_failed": rules_failed})}, run_id=run_id)
    context.build_data_docs(site_names=["llmops"])
    copy_assets(docs_dir)
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

    profiles = map_jobs(profile_shard, [(shard,) for shard in shards], workers=cfg.workers, desc="validate: profiling")
    profile = pd.concat(profiles, ignore_index=True) if profiles else profile_records(RECORD_SCHEMA.empty_table())
    with atomic_dir(Path(docs_dir)) as docs_tmp:
        per_expectation, failures = run_suite(profile, cfg, docs_tmp)
    valid = ShardWriter(valid_dir, shard_max_bytes=cfg.shard_max_bytes)
    quarantine = ShardWriter(quarantine_dir, shard_max_bytes=cfg.shard_max_bytes, schema=QUARANTINE_SCHEMA)
    position = 0
    for shard in progress(shards, desc="validate: splitting", unit="shard"):
        for row in iter_rows(shard):
            if position in failures:
                quarantine.add(row | {"failed_expectations": json.dumps(failures[position])})
            else:
                valid.add(row)
            position += 1
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
