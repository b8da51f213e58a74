import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmops.common.errors import DataError
from llmops.common.io import OUTPUT_MARKER, read_records
from llmops.data import sources
from llmops.params.ingest import IngestConfig
from tasks import ingest

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


def test_shard_writer_cuts_arrow_tables_where_it_cuts_rows(tmp_path):
    import random

    import pyarrow as pa

    from llmops.common.io import RECORD_SCHEMA, ShardWriter

    rng = random.Random(0)
    rows = [{"id": str(i), "text": None if i % 23 == 0 else "é✓x" * rng.randint(0, 120), "source": "s", "meta": "{}", "ingest_error": None} for i in range(600)]
    for shard_max_bytes in (1, 700, 10**9):
        by_row = ShardWriter(tmp_path / f"rows-{shard_max_bytes}", shard_max_bytes=shard_max_bytes)
        for row in rows:
            by_row.add(row)
        mixed = ShardWriter(tmp_path / f"mixed-{shard_max_bytes}", shard_max_bytes=shard_max_bytes)
        start = 0
        while start < len(rows):  # tables of 0 to 90 rows, some pieces added row by row between them
            piece = rows[start : start + rng.randint(0, 90)]
            if rng.random() < 0.3:
                for row in piece:
                    mixed.add(row)
            else:
                mixed.add_table(pa.Table.from_pylist(piece, schema=RECORD_SCHEMA))
            start += len(piece)
        expected, got = by_row.close(), mixed.close()
        assert [p.name for p in expected] == [p.name for p in got]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(expected, got, strict=True))
        assert mixed.rows == by_row.rows == 600 and mixed.text_bytes == by_row.text_bytes
    assert len(expected) == 1 and len(list((tmp_path / "mixed-700").iterdir())) > 20


def shard_md5s(out):
    return [hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(out.glob("part-*.parquet"))]


def jsonl_corpus(folder):
    """Two JSONL files of lines of varying length with blank lines, a bad-UTF-8 line and a malformed line; one ends in
    a newline, one does not."""
    lines = [json.dumps({"id": f"r{i}", "text": "w" * (i * 7 % 50)}).encode() for i in range(40)]
    lines[3:3] = [b"", b"   "]
    lines[10] = b'{"text": "caf\xe9"}'
    lines[17] = b"{not json"
    lines[25:25] = [b"", b""]
    folder.mkdir(parents=True)
    (folder / "ends_newline.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "no_newline.jsonl").write_bytes(b"\n".join(lines[:30]))
    return folder


def test_jsonl_cut_into_many_byte_ranges_reads_the_records_and_line_numbers_of_one_range(tmp_path):
    src = jsonl_corpus(tmp_path / "in")
    whole, _, whole_out = ingest_dir(tmp_path / "whole", source=str(src / "*.jsonl"))
    split, _, split_out = ingest_dir(tmp_path / "split", source=str(src / "*.jsonl"), split_bytes=13, workers=1)
    assert whole.metrics["splits"] == 1 and split.metrics["splits"] > 50
    assert read_records(split_out).to_pylist() == read_records(whole_out).to_pylist()
    assert split.metrics["blank_lines"] == whole.metrics["blank_lines"] == 4 + 4 + 1  # + the trailing newline's line
    numbered = [(r["source"], json.loads(r["meta"])["line"]) for r in read_records(split_out).to_pylist()]
    expected = [
        (f"in/{name}:{n}", n)
        for name in ("ends_newline.jsonl", "no_newline.jsonl")
        for n, line in enumerate((src / name).read_bytes().split(b"\n"), start=1)
        if line.strip()
    ]
    assert numbered == expected
    flagged = {r["source"]: r["ingest_error"].split(": ")[1].split(" ")[0] for r in read_records(split_out).to_pylist() if r["ingest_error"]}
    assert flagged == {f"in/{name}:{n}": kind for name in ("ends_newline.jsonl", "no_newline.jsonl") for n, kind in ((11, "not"), (18, "malformed"))}


def test_jsonl_shards_are_byte_identical_for_one_or_two_workers(tmp_path):
    src = jsonl_corpus(tmp_path / "in")
    one, _, one_out = ingest_dir(tmp_path / "one", source=str(src / "*.jsonl"), split_bytes=200, shard_max_bytes=60, workers=1)
    two, _, two_out = ingest_dir(tmp_path / "two", source=str(src / "*.jsonl"), split_bytes=200, shard_max_bytes=60, workers=2)
    assert one.metrics == two.metrics and one.metrics["shards"] > one.metrics["splits"] > 2
    assert shard_md5s(one_out) == shard_md5s(two_out)
    names = sorted(p.name for p in two_out.iterdir())
    assert names == sorted([OUTPUT_MARKER, "skipped.jsonl"] + [f"part-{k:05d}.parquet" for k in range(two.metrics["shards"])])


def test_parquet_row_groups_cut_into_splits_keep_their_row_numbers(tmp_path):
    import pyarrow as pa

    rows = [{"text": "t" * (i % 13)} for i in range(100)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=7)
    result, _, out = ingest_dir(tmp_path, source=str(tmp_path / "d.parquet"), split_bytes=100, workers=2)
    assert result.metrics["splits"] > 3 and result.metrics["files_read"] == 1
    table = read_records(out).to_pylist()
    assert [json.loads(r["meta"])["row"] for r in table] == list(range(100))
    assert [r["id"] for r in table] == [f"{tmp_path.name}/d.parquet:{i}" for i in range(100)]
    assert [r["text"] for r in table] == [r["text"] for r in rows]


def test_many_small_files_are_grouped_into_splits_in_order_with_skips_listed_in_place(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(30):
        (folder / f"f{i:02d}.py").write_text(f"v{i} = {i}\n" * (i % 5 + 1))
    (folder / "f10_big.py").write_text("x = 1\n" * 100)
    (folder / "f20_big.py").write_text("x = 1\n" * 100)
    whole, _, whole_out = ingest_dir(tmp_path / "whole", source=str(folder), max_file_bytes=500)
    split, _, split_out = ingest_dir(tmp_path / "split", source=str(folder), max_file_bytes=500, split_bytes=60, workers=2)
    assert 1 < split.metrics["splits"] < 30 and whole.metrics["splits"] == 1
    assert [r["id"] for r in read_records(split_out).to_pylist()] == [f"in/f{i:02d}.py" for i in range(30)]
    assert read_records(split_out).to_pylist() == read_records(whole_out).to_pylist()
    skipped = [json.loads(line)["path"] for line in (split_out / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [str(folder / "f10_big.py"), str(folder / "f20_big.py")]
    assert split.metrics == whole.metrics | {"shards": split.metrics["shards"], "splits": split.metrics["splits"]}
