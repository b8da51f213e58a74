import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmops.data import sources
from tasks import ingest
from llmops.params.ingest import IngestConfig
from llmops.common.errors import DataError
from llmops.common.io import read_records

from ..conftest import project_paths, write_jsonl

pytestmark = pytest.mark.unit


def ingest_dir(tmp_path, **cfg):
    out = tmp_path / "raw"
    result = ingest.run(IngestConfig(**cfg), project_paths(tmp_path, raw="raw"))
    table = read_records(out)
    return result, {r["id"]: r for r in table.to_pylist()}, out


def test_default_source_is_the_stdlib_python_files_without_site_packages():
    found = sources.resolve_sources("", "**/*.py", Path("/nonexistent"))
    assert len(found) > 1000
    assert all(label == "stdlib" and "site-packages" not in path.parts for label, _, path in found)
    assert any(path.name == "json" or path.parent.name == "json" for _, _, path in found)


def test_jsonl_malformed_lines_become_flagged_records_not_silent_drops(tmp_path):
    src = write_jsonl(tmp_path / "in" / "c.jsonl", [{"id": "a", "text": "good"}, "{not json", {"id": "b", "body": "x"}, "", {"text": "no id"}])
    result, records, _ = ingest_dir(tmp_path, source=str(src))
    assert result.metrics["docs"] == 4
    assert result.metrics["blank_lines"] == 2  # the empty line and the trailing newline
    assert records["a"]["ingest_error"] is None
    bad = records["in/c.jsonl:2"]
    assert "malformed JSON" in bad["ingest_error"] and "line 2" in bad["ingest_error"]
    assert bad["text"] == "{not json"
    assert "no string field 'text'" in records["in/c.jsonl:3"]["ingest_error"]
    assert records["in/c.jsonl:5"]["text"] == "no id"


def test_non_utf8_bytes_are_kept_with_the_byte_offset_of_the_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.txt").write_bytes(b"hello \xff\xfe world")
    _, records, _ = ingest_dir(tmp_path, source=str(tmp_path / "in"), file_glob="*.txt")
    record = records["in/bad.txt"]
    assert record["ingest_error"] == "not valid utf-8 at byte 6"
    assert "hello" in record["text"]


def test_python_files_are_decoded_with_their_declared_encoding(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "latin.py").write_bytes("# -*- coding: latin-1 -*-\nname = 'café'\n".encode("latin-1"))
    _, records, _ = ingest_dir(tmp_path, source=str(tmp_path / "in"))
    assert records["in/latin.py"]["ingest_error"] is None
    assert "café" in records["in/latin.py"]["text"]


def test_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="matched no files"):
        ingest.run(IngestConfig(source=str(tmp_path / "empty")), project_paths(tmp_path))
    assert not (tmp_path / "raw").exists()


def test_source_with_only_blank_lines_is_a_clear_error(tmp_path):
    src = tmp_path / "blank.jsonl"
    src.write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        ingest.run(IngestConfig(source=str(src)), project_paths(tmp_path))


def test_oversized_files_are_skipped_and_listed_with_the_reason(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.py").write_text("x = 1\n" * 100)
    (tmp_path / "in" / "small.py").write_text("y = 2\n")
    result, records, out = ingest_dir(tmp_path, source=str(tmp_path / "in"), max_file_bytes=100)
    assert list(records) == ["in/small.py"]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["path"].endswith("big.py") and "max_file_bytes" in skipped[0]["reason"]
    assert result.metrics["files_skipped"] == 1


def test_ids_are_stable_across_runs_and_independent_of_the_absolute_path(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name / "corpus").mkdir(parents=True)
        (tmp_path / name / "corpus" / "a.py").write_text("a = 1\n")
    _, first, _ = ingest_dir(tmp_path / "one", source=str(tmp_path / "one" / "corpus"))
    _, second, _ = ingest_dir(tmp_path / "two", source=str(tmp_path / "two" / "corpus"))
    assert list(first) == list(second) == ["corpus/a.py"]


def test_parquet_source_without_the_text_column_names_the_columns(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body\)"):
        ingest.run(IngestConfig(source=str(tmp_path / "d.parquet")), project_paths(tmp_path))


def test_parquet_and_saved_hf_dataset_sources_are_read(tmp_path):
    import datasets
    import pyarrow as pa

    pq.write_table(pa.table({"id": ["p1"], "text": ["from parquet"]}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"text": ["from hf", "again"]}).save_to_disk(str(tmp_path / "hfds"))
    result, records, _ = ingest_dir(tmp_path, source=[str(tmp_path / "d.parquet"), str(tmp_path / "hfds")])
    assert records["p1"]["text"] == "from parquet"
    assert sorted(r["text"] for r in records.values()) == ["again", "from hf", "from parquet"]
    assert result.metrics["docs"] == 3


def test_glob_source_expands_recursively(tmp_path):
    write_jsonl(tmp_path / "a" / "x.jsonl", [{"id": "1", "text": "one"}])
    write_jsonl(tmp_path / "a" / "b" / "y.jsonl", [{"id": "2", "text": "two"}])
    _, records, _ = ingest_dir(tmp_path, source=str(tmp_path / "a" / "**" / "*.jsonl"))
    assert sorted(records) == ["1", "2"]


def test_output_replaces_the_previous_shards_atomically(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": f"doc {i}"} for i in range(3)])
    ingest_dir(tmp_path, source=str(src))
    write_jsonl(src, [{"id": "only", "text": "one doc"}])
    _, records, out = ingest_dir(tmp_path, source=str(src))
    assert list(records) == ["only"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")]


def test_a_jsonl_or_parquet_corpus_larger_than_max_file_bytes_is_streamed_not_skipped(tmp_path):
    import pyarrow as pa

    rows = [{"id": f"r{i}", "text": f"def f{i}():\n    return {i}\n"} for i in range(300)]
    src = write_jsonl(tmp_path / "in" / "big.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows[:100]), tmp_path / "in" / "big.parquet", row_group_size=7)
    assert src.stat().st_size > 1000
    result, records, out = ingest_dir(tmp_path, source=str(tmp_path / "in" / "big.*"), max_file_bytes=1000, shard_max_bytes=2000)
    assert result.metrics["files_skipped"] == 0 and result.metrics["docs"] == 400
    assert records["r299"]["text"] == rows[299]["text"]
    metas = [json.loads(r["meta"]) for r in read_records(out).to_pylist() if r["source"].endswith("big.parquet:99")]
    assert metas and metas[0]["row"] == 99  # row numbers run on across row groups
    assert result.metrics["shards"] > 3  # cut while streaming, by shard_max_bytes


def test_a_failed_ingest_names_the_skip_reasons_and_lists_them_beside_the_output(tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.py", "b.py"):
        (tmp_path / "in" / name).write_text("x = 1\n" * 100)
    with pytest.raises(DataError, match=r"2 skipped: in/a.py: larger than ingest.max_file_bytes \(600 > 100\)") as err:
        ingest.run(IngestConfig(source="in", max_file_bytes=100), project_paths(tmp_path, raw="data/raw"))
    listing = tmp_path / "data" / "raw-skipped.jsonl"
    assert str(listing) in str(err.value)
    assert [json.loads(line)["path"] for line in listing.read_text().splitlines()] == ["in/a.py", "in/b.py"]
    assert not (tmp_path / "data" / "raw").exists()  # no partial output


def test_shard_writer_cuts_where_write_records_does(tmp_path):
    import pyarrow as pa

    from llmops.common.io import RECORD_SCHEMA, ShardWriter, write_records

    rows = [{"id": str(i), "text": "x" * (i % 17 * 50), "source": "s", "meta": "{}", "ingest_error": None} for i in range(200)]
    whole = write_records(tmp_path / "a", pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), shard_max_bytes=1500)
    writer = ShardWriter(tmp_path / "b", shard_max_bytes=1500)
    for row in rows:
        writer.add(row)
    streamed = writer.close()
    assert [p.name for p in whole] == [p.name for p in streamed] and len(whole) > 5
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(whole, streamed, strict=True))
