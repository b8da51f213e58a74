"""The data contract: a Great Expectations suite over a per-record profile, run shard by shard in parallel, merged
into whole-corpus results and offline Data Docs, and the split of records into valid and quarantined (each with the
rules it failed). The validate stage and the drift monitor both run it.

The expectations run on a per-record profile (length, longest line, NUL and control-char
counts, alphanumeric ratio, ingest error, id, and how many records of the corpus share the id), so each rule is a
declared GX expectation and the Data Docs stay small even when a record is a 5 MB single line. Each rule has a short
name (`meta["rule"]`): the quarantine reason starts with it and the stage's metric keys use it. A record
that fails any rule goes to quarantine, by design: the rules hold when `min_pass_rate` of the
records meet them, and a second GX suite, quarantine_gate, checks the share of records that meet
every rule against `min_pass_rate`, so the Data Docs say "Succeeded" with the count quarantined.

Both suites run on one shard at a time (an engine job, `check_shard`); a job returns per-expectation counts and the
rows it failed, and `merge_checks` adds the counts up and decides each expectation's success the way GX does, over the
whole corpus. Id uniqueness across shards needs no ids in memory: a first pass hashes each id to 8 bytes, and only
the ids whose hash repeats are read back and counted (`duplicate_id_counts`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from functools import cache
from hashlib import blake2b
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from llmops.common import env
from llmops.common.errors import StageError
from llmops.common.io import RECORD_SCHEMA, ShardWriter, atomic_dir, read_shard, release_free_memory
from llmops.common.progress import progress
from llmops.data.engine import map_jobs
from llmops.params.validate import ValidateConfig

# Control characters that do not belong in text or code (tab, newline, CR and form feed do).
CONTROL_CHARS_RE = "[\x01-\x08\x0b\x0e-\x1f\x7f]"


def _hashes(ids: list[str]) -> np.ndarray:
    return np.fromiter((int.from_bytes(blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids), dtype=np.uint64, count=len(ids))


def id_hashes(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An 8-byte blake2b hash (uint64) of each non-null id: what the corpus-wide uniqueness check holds per record."""
    return _hashes([i for i in ids.to_pylist() if i is not None])


def ids_with_hashes(ids: pa.ChunkedArray | pa.Array, hashes: np.ndarray) -> list[str]:
    """The non-null ids whose `id_hashes` value is in `hashes`."""
    values = [i for i in ids.to_pylist() if i is not None]
    return [i for i, hit in zip(values, np.isin(_hashes(values), hashes)) if hit]


def shard_id_hashes(shard: Path) -> np.ndarray:
    """id_hashes of one Parquet shard (an engine job)."""
    return id_hashes(read_shard(shard, ["id"]).column("id"))


def shard_ids_with_hashes(shard: Path, hashes: np.ndarray) -> list[str]:
    """ids_with_hashes of one Parquet shard (an engine job)."""
    return ids_with_hashes(read_shard(shard, ["id"]).column("id"), hashes)


def duplicate_id_counts(hashes: list[np.ndarray], ids_in: Callable[[list[int], np.ndarray], list[list[str]]]) -> dict[str, int]:
    """{id: records sharing it} for every id more than one record of the corpus has; `hashes` holds id_hashes per part.

    Only the hashes that repeat are looked up again: `ids_in(parts, repeated)` returns, for each of those parts, its
    ids with a repeated hash, and counting those ids tells a shared id from two ids whose hashes collide.
    """
    values, counts = np.unique(np.concatenate(hashes) if hashes else np.empty(0, np.uint64), return_counts=True)
    repeated = values[counts > 1]
    if not repeated.size:
        return {}
    parts = [i for i, part in enumerate(hashes) if np.isin(part, repeated).any()]
    shared = Counter(i for ids in ids_in(parts, repeated) for i in ids)
    return {i: n for i, n in sorted(shared.items()) if n > 1}


def longest_line_chars(text: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The characters of each text's longest line (lines split at "\n", as str.split does; null for a null text),
    computed in Arrow: no Python string per record."""
    text = text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
    lines = pc.split_pattern(text, "\n")
    longest = np.zeros(len(text), dtype=np.int64)
    np.maximum.at(longest, pc.list_parent_indices(lines).to_numpy(), pc.utf8_length(pc.list_flatten(lines)).to_numpy())
    return pa.array(longest, mask=text.is_null().to_numpy(zero_copy_only=False))


def profile_records(table: pa.Table, id_counts: dict[str, int]) -> pd.DataFrame:
    """One row per record with the measurements the expectations check; `id_counts` (duplicate_id_counts) gives
    `id_count`, the records of the whole corpus that share the record's id (1 for an id no other record has)."""
    text = table.column("text")
    ids = table.column("id")
    chars = pc.utf8_length(text)
    safe_chars = pc.max_element_wise(pc.fill_null(chars, 0), 1)
    id_count = pc.if_else(pc.is_null(ids), pa.scalar(None, pa.int64()), pa.scalar(1, pa.int64()))
    if id_counts:
        shared = pc.take(pa.array(list(id_counts.values()), pa.int64()), pc.index_in(ids, value_set=pa.array(list(id_counts), ids.type)))
        id_count = pc.coalesce(shared, id_count)
    return pd.DataFrame(
        {
            "id": ids.to_pandas(),
            "id_count": id_count.to_pandas().astype("Int64"),
            "text_chars": chars.to_pandas().astype("Int64"),
            "max_line_chars": longest_line_chars(text).to_pandas().astype("Int64"),
            "nul_chars": pc.count_substring(text, "\x00").to_pandas().astype("Int64"),
            "control_char_ratio": pc.divide(pc.cast(pc.count_substring_regex(text, CONTROL_CHARS_RE), pa.float64()), safe_chars).to_pandas(),
            "alnum_ratio": pc.divide(pc.cast(pc.count_substring_regex(text, r"[\p{L}\p{N}]"), pa.float64()), safe_chars).to_pandas(),
            "ingest_error": table.column("ingest_error").to_pandas(),
        }
    )


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
        (
            "id_unique",
            "ids are unique: id_count (records of the whole corpus with the id) is 1; records that share an id are all quarantined",
            gxe.ExpectColumnValuesToBeBetween(column="id_count", max_value=1, **most),
        ),
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


RULES_FORMAT = {"result_format": "COMPLETE", "partial_unexpected_count": 20}  # every failing row's index: the quarantine
SUMMARY_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 20}


@cache
def _worker_batches() -> dict[str, Any]:
    """The rules' and the gate's dataframe batch definitions in an ephemeral GX context, made once per process
    (GX's import and first context take ~3 s); validating a batch there writes nothing, not even Data Docs."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=env.library_progress_enabled())  # GX's "Calculating Metrics" bars
    source = context.data_sources.add_pandas(DATASOURCE)
    return {asset: source.add_dataframe_asset(asset).add_batch_definition_whole_dataframe("whole_corpus") for asset in (RULES_ASSET, GATE_ASSET)}


def _validate(asset: str, frame: pd.DataFrame, suite_name: str, expectations: list[Any], result_format: dict[str, Any]) -> Any:
    import great_expectations as gx

    batch = _worker_batches()[asset].get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(gx.ExpectationSuite(name=suite_name, expectations=expectations), result_format=result_format)


def _counts(result: Any) -> dict[str, Any]:
    """What merge_checks adds up from one column expectation's result on one shard (a table expectation's, the row
    count, is the shard's "rows")."""
    counts = result.result
    return {
        "missing_count": counts.get("missing_count"),  # None where GX counts nulls as values (the null checks)
        "unexpected_count": counts.get("unexpected_count"),
        "partial_unexpected_list": list(counts.get("partial_unexpected_list") or [])[: SUMMARY_FORMAT["partial_unexpected_count"]],
    }


def _gx_errors(exception_info: dict[str, Any]) -> str:
    """The messages in a GX result's exception_info: one exception's fields, or one such per metric that failed."""
    infos = [exception_info] if "exception_message" in exception_info else list(exception_info.values())
    return "; ".join(dict.fromkeys(str(i.get("exception_message") if isinstance(i, dict) else getattr(i, "exception_message", i)) for i in infos))


def check_profile(profile: pd.DataFrame, cfg: ValidateConfig, where: str = "the records") -> dict[str, Any]:
    """Both suites on the profile of one shard (`where`, for errors): {"rows", "failures" (row position -> names of the
    rules it failed, failing rows only), RULES_SUITE and GATE_SUITE ({rule: counts} per expectation)}."""
    rows = len(profile)
    result = _validate(RULES_ASSET, profile, RULES_SUITE, build_suite(cfg), RULES_FORMAT)
    failures: dict[int, list[str]] = {}
    rules: dict[str, dict[str, Any]] = {}
    for er in result.results:
        name = expectation_name(er.expectation_config)
        if not er.result:  # GX could not compute the expectation's metrics; counting it as passed would hide that
            raise StageError(f"validate: GX could not evaluate {name} on {where}: {_gx_errors(er.exception_info)}")
        for pos in er.result.get("unexpected_index_list") or []:
            failures.setdefault(int(pos), []).append(name)
        rules[er.expectation_config.meta["rule"]] = _counts(er)
    rules_failed = np.zeros(rows, dtype=np.int64)
    for pos, names in failures.items():
        rules_failed[pos] = len(names)
    gate = _validate(GATE_ASSET, pd.DataFrame({"rules_failed": rules_failed}), GATE_SUITE, [gate_expectation(cfg, len(failures), rows)], SUMMARY_FORMAT)
    return {"rows": rows, "failures": failures, RULES_SUITE: rules, GATE_SUITE: {er.expectation_config.meta["rule"]: _counts(er) for er in gate.results}}


def check_shard(shard: Path, cfg: ValidateConfig, id_counts: dict[str, int]) -> dict[str, Any]:
    """check_profile of one Parquet shard (an engine job)."""
    checked = check_profile(profile_records(read_shard(shard, ["id", "text", "ingest_error"]), id_counts), cfg, str(shard))
    release_free_memory()  # a worker checks shard after shard: what one shard used is not kept for the next
    return checked


def corpus_result(expectation: Any, rows: int, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """One expectation's result over the whole corpus from its counts per shard: GX's own `_validate` decides success
    (`mostly` over the non-null values of the corpus, over every value for the null checks) and lays out the result."""
    missing = [s["missing_count"] for s in shards]
    metrics: dict[str, Any] = {"table.row_count": rows}
    map_metric = getattr(expectation, "map_metric", None)
    if map_metric:
        if None not in missing:
            metrics["column_values.nonnull.unexpected_count"] = sum(missing)
        metrics[f"{map_metric}.unexpected_count"] = sum(s["unexpected_count"] or 0 for s in shards)
        metrics[f"{map_metric}.unexpected_values"] = [v for s in shards for v in s["partial_unexpected_list"]][: SUMMARY_FORMAT["partial_unexpected_count"]]
    return expectation._validate(metrics=metrics, runtime_configuration={"result_format": SUMMARY_FORMAT})


def merge_checks(checks: list[dict[str, Any]], cfg: ValidateConfig) -> dict[str, Any]:
    """check_profile results, one per shard in corpus order, merged into the whole corpus's: {"rows", "failures"
    (corpus position -> rule names), "per_expectation" (rule, expectation, success, failed_rows, pass_rate) and
    "suites" ([(suite name, asset, expectations, results)] for the Data Docs)}."""
    rows = sum(c["rows"] for c in checks)
    failures: dict[int, list[str]] = {}
    offset = 0
    for check in checks:
        failures.update((offset + pos, names) for pos, names in check["failures"].items())
        offset += check["rows"]
    suites = []
    for name, asset, expectations in (
        (RULES_SUITE, RULES_ASSET, build_suite(cfg)),
        (GATE_SUITE, GATE_ASSET, [gate_expectation(cfg, len(failures), rows)]),
    ):
        results = [corpus_result(e, rows, [c[name][e.meta["rule"]] for c in checks]) for e in expectations]
        suites.append((name, asset, expectations, results))
    per_expectation = []
    for expectation, result in zip(suites[0][2], suites[0][3]):
        unexpected = result["result"].get("unexpected_count")
        failed_rows = unexpected if unexpected is not None else (0 if result["success"] else rows)
        per_expectation.append(
            {
                "rule": expectation.meta["rule"],
                "expectation": expectation_name(expectation.configuration),
                "success": bool(result["success"]),
                "failed_rows": failed_rows,
                "pass_rate": 1 - failed_rows / rows if rows else 0.0,
            }
        )
    return {"rows": rows, "failures": failures, "per_expectation": per_expectation, "suites": suites}


def write_data_docs(suites: list[tuple[str, str, list[Any], list[dict[str, Any]]]], docs_dir: Path) -> None:
    """Offline Data Docs at `docs_dir` of merge_checks' whole-corpus results: one validation per suite, stored in an
    ephemeral context the way a checkpoint stores its own, then rendered by GX."""
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult, ExpectationValidationResult
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier, ValidationResultIdentifier

    from llmops.data.data_docs import copy_assets, site_config

    context = gx.get_context(mode="ephemeral")
    context.add_data_docs_site(site_name="llmops", site_config=site_config(docs_dir))
    run_id = RunIdentifier(run_name=RUN_NAME)
    for name, asset, expectations, results in suites:
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        evrs = [ExpectationValidationResult(success=r["success"], result=r["result"], expectation_config=e.configuration) for e, r in zip(suite.expectations, results)]
        passed = sum(bool(r.success) for r in evrs)
        batch = f"{DATASOURCE}-{asset}"
        meta = {
            "great_expectations_version": gx.__version__,
            "batch_spec": {"batch_data": "PandasDataFrame"},
            "active_batch_definition": {"datasource_name": DATASOURCE, "data_connector_name": "fluent", "data_asset_name": asset, "batch_identifiers": {"dataframe": "<DATAFRAME>"}},
            "run_id": run_id,
            "validation_time": run_id.run_time,
            "batch_parameters": {"dataframe": "<DATAFRAME>"},
        }
        statistics = {
            "evaluated_expectations": len(evrs),
            "successful_expectations": passed,
            "unsuccessful_expectations": len(evrs) - passed,
            "success_percent": 100 * passed / len(evrs),
        }
        result = ExpectationSuiteValidationResult(success=passed == len(evrs), results=evrs, suite_name=name, statistics=statistics, meta=meta, batch_id=batch)
        key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=name), run_id=run_id, batch_identifier=batch)
        context.validation_results_store.set(key, result)
    context.build_data_docs(site_names=["llmops"])
    copy_assets(docs_dir)


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

    Three passes over the shards, the first two in parallel engine jobs. The first hashes the ids and reads the ids
    again only in shards that hold a repeated hash (duplicate_id_counts); the second profiles each shard and runs both
    suites on it (check_shard), and the driver merges the shards' counts into whole-corpus results and Data Docs. The
    third splits each shard into `valid_dir` and `quarantine_dir` (each record that failed carries the names of what
    it failed) through shard writers. Memory holds the id hashes (8 bytes per record, a few times that while they are
    counted), the failing rows' rule names and a few shards, never the corpus or a per-record profile of it. The
    output directories must be temp directories (atomic_dir).
    """
    hashes = map_jobs(shard_id_hashes, [(shard,) for shard in shards], workers=cfg.workers, desc="validate: hashing ids")

    def ids_in(parts: list[int], repeated: np.ndarray) -> list[list[str]]:
        return map_jobs(shard_ids_with_hashes, [(shards[i], repeated) for i in parts], workers=cfg.workers, desc="validate: shared ids")

    id_counts = duplicate_id_counts(hashes, ids_in)
    del hashes
    _worker_batches()  # GX's import (~3 s) once, here: the process pool's forked workers inherit it; the Data Docs need it too
    if shards:
        checks = map_jobs(check_shard, [(shard, cfg, id_counts) for shard in shards], workers=cfg.workers, desc="validate: checking")
    else:
        checks = [check_profile(profile_records(RECORD_SCHEMA.empty_table(), {}), cfg)]
    corpus = merge_checks(checks, cfg)
    del checks
    with atomic_dir(Path(docs_dir)) as docs_tmp:
        write_data_docs(corpus["suites"], docs_tmp)
    failures = corpus["failures"]
    valid = ShardWriter(valid_dir, shard_max_bytes=cfg.shard_max_bytes)
    quarantine = ShardWriter(quarantine_dir, shard_max_bytes=cfg.shard_max_bytes, schema=QUARANTINE_SCHEMA)
    failing = np.array(sorted(failures), dtype=np.int64)
    offset = 0
    for shard in progress(shards, desc="validate: splitting", unit="shard"):
        table = read_shard(shard)
        lo, hi = np.searchsorted(failing, [offset, offset + table.num_rows])
        validated, quarantined = split_by_failures(table, {int(p) - offset: failures[int(p)] for p in failing[lo:hi]})
        valid.add_table(validated)
        quarantine.add_table(quarantined)
        offset += table.num_rows
        del table, validated, quarantined
        release_free_memory()
    valid.close()
    quarantine.close()
    return corpus["rows"], quarantine.rows, corpus["per_expectation"]


def validate_records(table: pa.Table, cfg: ValidateConfig, docs_dir: Path) -> tuple[pa.Table, pa.Table, list[dict[str, Any]]]:
    """validate_shards' checks on `table` as one shard (Data Docs written to `docs_dir` in one rename):
    (valid, quarantined, per-expectation results)."""
    ids = table.column("id")
    id_counts = duplicate_id_counts([id_hashes(ids)], lambda parts, repeated: [ids_with_hashes(ids, repeated)])
    corpus = merge_checks([check_profile(profile_records(table, id_counts), cfg)], cfg)
    with atomic_dir(Path(docs_dir)) as docs_tmp:
        write_data_docs(corpus["suites"], docs_tmp)
    validated, quarantined = split_by_failures(table, corpus["failures"])
    return validated, quarantined, corpus["per_expectation"]
