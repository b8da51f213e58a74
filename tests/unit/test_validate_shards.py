"""validate per shard: both GX suites run on each shard, and the merged counts, successes, quarantine and Data Docs
are those of the whole corpus."""

import html
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.common.errors import StageError
from llmops.common.io import RECORD_SCHEMA, read_records
from llmops.data.expectations import check_profile, duplicate_id_counts, merge_checks, profile_records, validate_records, validate_shards
from llmops.params.validate import ValidateConfig

pytestmark = pytest.mark.unit

GOOD = "def f(x):\n    return x + 1\n"


def record(record_id, text=GOOD, ingest_error=None):
    return {"id": record_id, "text": text, "source": "test", "meta": "{}", "ingest_error": ingest_error}


def table(rows):
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def write_shards(folder, parts):
    folder.mkdir(parents=True)
    shards = []
    for i, rows in enumerate(parts):
        pq.write_table(table(rows), folder / f"part-{i:05d}.parquet")
        shards.append(folder / f"part-{i:05d}.parquet")
    return shards


def run_shards(root, parts, cfg):
    """validate_shards over `parts` (one shard each): (records in, quarantined table, per-expectation results)."""
    for sub in ("valid", "quarantine"):
        (root / sub).mkdir(parents=True)
    rows, _, per_expectation = validate_shards(write_shards(root / "raw", parts), cfg, root / "data_docs", root / "valid", root / "quarantine")
    return rows, read_records(root / "quarantine"), per_expectation


def by_rule(per_expectation):
    return {e["rule"]: e for e in per_expectation}


def mixed_parts():
    """Four shards with every kind of failure: an empty, a null and a NUL text, control characters, an ingest error,
    a null id, an id repeated inside a shard and one repeated across shards."""
    return [
        [record("a"), record("b"), record("empty", ""), record("shared"), record(None)],
        [record("c"), record("nul", "bad\x00text"), record("null", None), record("twice"), record("twice")],
        [record("d"), record("ctrl", "x\x01" * 50), record("latin", None, "invalid utf-8"), record("e")],
        [record("f"), record("shared", "def g():\n    pass\n"), record("sym", "{}[]();" * 20)],
    ]


def test_shards_merge_to_the_counts_and_quarantine_of_one_shard_holding_everything(tmp_path):
    cfg = ValidateConfig(min_pass_rate=0.5, workers=2)
    parts = mixed_parts()
    rows, quarantined, per_shards = run_shards(tmp_path / "shards", parts, cfg)
    _, whole_quarantined, per_whole = validate_records(table([r for part in parts for r in part]), cfg, tmp_path / "whole_docs")
    assert rows == sum(map(len, parts))
    assert per_shards == per_whole
    assert quarantined.to_pylist() == whole_quarantined.to_pylist()
    assert quarantined.num_rows == 11  # every record but the six good ones


def test_ids_shared_across_shards_are_all_quarantined(tmp_path):
    parts = [[record("x"), record("a")], [record("b")], [record("c"), record("x", "x = 2\n")]]
    _, quarantined, per_expectation = run_shards(tmp_path, parts, ValidateConfig(min_pass_rate=0.5))
    assert quarantined.column("id").to_pylist() == ["x", "x"]
    assert quarantined.column("failed_expectations").to_pylist() == ['["id_unique: expect_column_values_to_be_between(id_count, max_value=1)"]'] * 2
    assert by_rule(per_expectation)["id_unique"]["failed_rows"] == 2


def test_ids_whose_hashes_collide_are_not_counted_as_shared():
    hashes = [np.array([5, 7], dtype=np.uint64), np.array([5], dtype=np.uint64)]
    assert duplicate_id_counts(hashes, lambda parts, repeated: [["a"], ["b"]]) == {}
    assert duplicate_id_counts(hashes, lambda parts, repeated: [["a"], ["a"]]) == {"a": 2}


def checks_of(cfg, *parts):
    return [check_profile(profile_records(table(rows), {}), cfg) for rows in parts]


def test_mostly_holds_over_the_corpus_when_one_shard_alone_would_fail_it():
    cfg = ValidateConfig(min_pass_rate=0.5)
    mostly_empty = [record("a"), record("b", ""), record("c", "")]  # text_length: 1 of 3 pass
    all_good = [record(f"g{i}") for i in range(5)]
    assert not by_rule(merge_checks(checks_of(cfg, mostly_empty), cfg)["per_expectation"])["text_length"]["success"]
    corpus = merge_checks(checks_of(cfg, mostly_empty, all_good), cfg)
    assert by_rule(corpus["per_expectation"])["text_length"] == {
        "rule": "text_length",
        "expectation": "text_length: expect_column_values_to_be_between(text_chars, max_value=2000000, min_value=1)",
        "success": True,
        "failed_rows": 2,
        "pass_rate": 1 - 2 / 8,
    }


def test_mostly_fails_over_the_corpus_when_one_shard_alone_would_pass_it():
    cfg = ValidateConfig(min_pass_rate=0.6)
    passing = [record("a"), record("b"), record("c", "")]  # 2 of 3 pass
    failing = [record("d", ""), record("e", ""), record("f", ""), record("g")]  # 1 of 4 pass
    assert by_rule(merge_checks(checks_of(cfg, passing), cfg)["per_expectation"])["text_length"]["success"]
    assert not by_rule(merge_checks(checks_of(cfg, passing, failing), cfg)["per_expectation"])["text_length"]["success"]


def test_mostly_counts_only_non_null_values_as_gx_does():
    cfg = ValidateConfig(min_pass_rate=0.5)
    nulls = [record("a"), record("b", ""), record("c", None), record("d", None)]  # text_length: 1 of 2 non-null texts pass
    rules = by_rule(merge_checks(checks_of(cfg, nulls[:2], nulls[2:]), cfg)["per_expectation"])
    assert rules["text_length"]["success"] and rules["text_length"]["failed_rows"] == 1
    assert rules["text_not_null"]["success"] and rules["text_not_null"]["failed_rows"] == 2  # not-null: over every record


def test_an_expectation_gx_cannot_evaluate_stops_the_check_naming_the_rule_and_the_shard():
    profile = profile_records(table([record("a")]), {}).drop(columns=["nul_chars"])
    with pytest.raises(StageError, match=r'no_nul_chars: .* on part-00007.parquet: .*The column "nul_chars" in BatchData does not exist'):
        check_profile(profile, ValidateConfig(), "part-00007.parquet")


def page_text(docs, suite):
    (page,) = (docs / "validations" / suite).rglob("*.html")
    source = re.sub(r"<script.*?</script>|<style.*?</style>", " ", page.read_text(), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", source)))


def test_data_docs_show_the_whole_corpus_counts(tmp_path):
    parts = [[record(f"{s}{i}") for i in range(4)] + [record(f"{s}-empty", "")] for s in "abc"]  # 15 records, 3 empty
    run_shards(tmp_path, parts, ValidateConfig(min_pass_rate=0.5))
    rules = page_text(tmp_path / "data_docs", "record_rules")
    assert "has_rows: the corpus has at least one record 15 " in rules
    assert "Evaluated Expectations 10 Successful Expectations 10" in rules
    assert "20% unexpected" in rules  # text_length: 3 of 15
    gate = page_text(tmp_path / "data_docs", "quarantine_gate")
    assert "pass_rate: 12 of 15 records pass every rule (80.00%), at least 50.00% required; 3 quarantined" in gate
    assert "Status: Succeeded" in gate


def test_longest_line_chars_counts_characters_of_the_longest_line_as_str_split_does():
    import pyarrow as pa

    from llmops.data.expectations import longest_line_chars

    texts = ["", "a", "a\nbc", "\n\n", "é✓\nxx\r\nyyy", None, "x" * 10 + "\n", "\r\n"]
    expected = [max(map(len, t.split("\n"))) if t is not None else None for t in texts]
    assert longest_line_chars(pa.chunked_array([texts[:3], texts[3:]], pa.string())).to_pylist() == expected == [0, 1, 2, 0, 3, None, 10, 1]
