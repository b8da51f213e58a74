import json
import re

import pytest

from tasks import ingest, validate
from llmops.params.ingest import IngestConfig
from llmops.params.validate import ValidateConfig
from llmops.common.errors import DataError
from llmops.common.io import read_records

from ..conftest import project_paths, write_jsonl

pytestmark = pytest.mark.unit

GOOD_FILES = 10
DOCS = "reports/validate/data_docs"


def build_bad_corpus(root):
    files = root / "files"
    files.mkdir(parents=True)
    for i in range(GOOD_FILES):
        (files / f"good{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (files / "empty.py").write_text("")
    (files / "binary.py").write_bytes(bytes(range(0, 32)) * 64)
    (files / "oneline.py").write_text("x = 1; " * 750_000)  # a 5 MB single line
    (files / "latin.py").write_bytes(b"caf\xe9 = 1\n")  # not UTF-8, no coding cookie
    jsonl = write_jsonl(root / "extra.jsonl", [{"id": "dup", "text": "first copy"}, {"id": "dup", "text": "second copy"}])
    raw = root / "raw"
    ingest.run(IngestConfig(source=[str(files), str(jsonl)]), project_paths(root, raw="raw"))
    return raw


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    build_bad_corpus(root)
    result = validate.run(ValidateConfig(min_pass_rate=0.5), project_paths(root, raw="raw", validated="ok", quarantine="quarantine", reports="reports"))
    quarantined = {r["id"]: json.loads(r["failed_expectations"]) for r in read_records(root / "quarantine").to_pylist()}
    return root, result, quarantined


def reasons(quarantined, record_id):
    return " | ".join(quarantined[record_id])


def test_every_record_is_either_validated_or_quarantined(validated):
    root, result, _ = validated
    kept = read_records(root / "ok").num_rows
    quarantined_rows = read_records(root / "quarantine").num_rows
    assert result.metrics["docs_in"] == GOOD_FILES + 6
    assert kept == GOOD_FILES == result.metrics["docs_out"]
    assert kept + quarantined_rows == result.metrics["docs_in"]
    assert quarantined_rows == result.metrics["quarantined"]


def test_empty_document_is_quarantined_for_its_length(validated):
    assert "text_chars, max_value=2000000, min_value=1" in reasons(validated[2], "files/empty.py")


def test_binary_blob_is_quarantined_for_nul_and_control_characters(validated):
    why = reasons(validated[2], "files/binary.py")
    assert "nul_chars" in why and "control_char_ratio" in why


def test_five_megabyte_single_line_is_quarantined_for_its_longest_line(validated):
    assert "max_line_chars" in reasons(validated[2], "files/oneline.py")


def test_undecodable_file_is_quarantined_with_the_ingest_error(validated):
    assert "expect_column_values_to_be_null(ingest_error)" in reasons(validated[2], "files/latin.py")


def test_duplicate_ids_are_both_quarantined_as_ambiguous(validated):
    root, _, quarantined = validated
    dup_rows = [r for r in read_records(root / "quarantine").to_pylist() if r["id"] == "dup"]
    assert len(dup_rows) == 2
    assert all("id_unique: expect_column_values_to_be_between(id_count, max_value=1)" in r["failed_expectations"] for r in dup_rows)


def test_pass_rate_and_failed_rows_are_reported_per_rule(validated):
    _, result, _ = validated
    by_rule = result.metrics["rule"]
    assert by_rule["id_unique"] == {"failed": 2, "pass_rate": pytest.approx(1 - 2 / 16)}
    assert by_rule["id_not_null"] == {"failed": 0, "pass_rate": 1.0}
    assert result.metrics["pass_rate"] == pytest.approx(GOOD_FILES / 16)


def test_mlflow_metric_keys_are_short_rule_names_without_spaces(validated):
    _, result, _ = validated
    keys = set(result.numeric_metrics())
    assert {"docs_in", "docs_out", "quarantined", "pass_rate", "rule.id_unique.failed", "rule.text_length.pass_rate"} <= keys
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key) for key in keys), sorted(keys)
    assert len(keys) == 4 + 2 * 10  # the counters, then failed and pass_rate for each of the ten rules


def test_quarantine_reason_starts_with_the_rule_name(validated):
    assert reasons(validated[2], "files/empty.py").startswith("text_length: expect_column_values_to_be_between(text_chars")


def test_summary_says_passed_with_the_quarantined_count(validated):
    _, result, _ = validated
    assert result.summary.startswith("validate: passed, 16 records -> 10 valid (62.50%, at least 50.00% required)")
    assert "6 quarantined" in result.summary


def test_data_docs_html_is_written(validated):
    root, _, _ = validated
    assert (root / DOCS / "index.html").exists()
    assert list((root / DOCS / "validations").rglob("*.html"))


def test_pass_rate_under_the_threshold_fails_and_still_writes_the_quarantine(tmp_path):
    build_bad_corpus(tmp_path)
    with pytest.raises(DataError) as err:
        validate.run(ValidateConfig(min_pass_rate=0.9), project_paths(tmp_path, raw="raw", validated="ok", quarantine="quarantine", reports="reports"))
    message = str(err.value)
    assert "62.50%" in message and "validate.min_pass_rate 90.00%" in message
    assert str(tmp_path / "quarantine") in message
    assert read_records(tmp_path / "quarantine").num_rows == 6
    assert not (tmp_path / "ok").exists()  # nothing half-done is left as the validated output


def test_one_or_two_workers_over_many_small_shards_write_the_same_bytes(tmp_path):
    import hashlib

    rows = [{"id": f"doc{i}", "text": f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 7)} for i in range(120)]
    rows += [{"id": "doc3", "text": "a second doc3"}, {"id": "nul", "text": "bad\x00text"}]
    write_jsonl(tmp_path / "corpus.jsonl", rows)
    ingest.run(IngestConfig(source=str(tmp_path / "corpus.jsonl"), shard_max_bytes=400), project_paths(tmp_path, raw="raw"))
    assert len(list((tmp_path / "raw").glob("part-*.parquet"))) > 10
    outputs = []
    for workers in (1, 2):
        paths = project_paths(tmp_path, raw="raw", validated=f"ok{workers}", quarantine=f"q{workers}", reports=f"reports{workers}")
        metrics = validate.run(ValidateConfig(min_pass_rate=0.5, shard_max_bytes=400, workers=workers), paths).metrics
        files = {f"{d.name[:-1]}/{p.name}": hashlib.md5(p.read_bytes()).hexdigest() for d in (paths.validated, paths.quarantine) for p in sorted(d.iterdir())}
        outputs.append((metrics, files))
    assert outputs[0] == outputs[1]
    assert outputs[0][0]["quarantined"] == 3 and len(outputs[0][1]) > 10  # both doc3 records and the NUL one
