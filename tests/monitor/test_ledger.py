"""The monitor's ledger: batch files it checked are known by path, size and mtime; a batch reader that names its glob."""

import json
import os

import pytest

from llmops.common.errors import DataError
from llmops.monitoring import drift
from llmops.monitoring.ledger import LEDGER_FILE, Ledger, file_key, record
from llmops.params.load import parse_params

from ..conftest import write_jsonl

pytestmark = pytest.mark.unit


def entry(step: int, batch_id: str = "b") -> dict:
    return {"step": step, "batch_id": batch_id, "checked_at": "2026-01-01T00:00:00+00:00", "scores": {}}


def test_a_recorded_file_is_seen_until_it_is_rewritten(tmp_path):
    old, new = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": "x"}]), write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": "y"}])
    ledger = Ledger(tmp_path / "monitor")
    with ledger.update() as state:
        record(state, [file_key(old)], entry(0))
    assert ledger.seen({f: file_key(f) for f in (old, new)}) == ([new], [old])
    stat = old.stat()
    os.utime(old, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the same path written again: new data
    assert ledger.seen({old: file_key(old)}) == ([old], [])


def test_checks_are_appended_in_order_and_the_ledger_file_is_whole_json(tmp_path):
    ledger = Ledger(tmp_path / "monitor")
    for step in range(3):
        with ledger.update() as state:
            assert len(state["batches"]) == step
            record(state, [f"/x/{step}|1|1"], entry(step, f"id{step}"))
    saved = json.loads((tmp_path / "monitor" / LEDGER_FILE).read_text())
    assert [b["step"] for b in saved["batches"]] == [0, 1, 2]
    assert saved["files"]["/x/2|1|1"]["batch_id"] == "id2"
    assert not [p.name for p in (tmp_path / "monitor").iterdir() if p.name not in (LEDGER_FILE, LEDGER_FILE + ".lock")], "no temp file left"


def test_an_update_that_fails_leaves_the_ledger_as_it_was(tmp_path):
    ledger = Ledger(tmp_path / "monitor")
    with ledger.update() as state:
        record(state, ["/x|1|1"], entry(0))
    with pytest.raises(RuntimeError), ledger.update() as state:
        record(state, ["/y|1|1"], entry(1))
        raise RuntimeError("the MLflow run could not be logged")
    assert [b["step"] for b in ledger.read()["batches"]] == [0]


def test_a_ledger_that_is_not_json_is_named_with_what_to_do(tmp_path):
    (tmp_path / LEDGER_FILE).write_text("{half")
    with pytest.raises(DataError, match=rf"{LEDGER_FILE}: not valid JSON .* move it aside"):
        Ledger(tmp_path).read()


def test_a_directory_batch_that_matches_nothing_names_the_glob_it_applied(tmp_path):
    params = parse_params({}, root=tmp_path)
    docs = tmp_path / "incoming" / "docs"
    docs.mkdir(parents=True)
    (docs / "notes.txt").write_text("plain text, not Python")
    with pytest.raises(DataError) as caught:
        drift.run(params, "incoming/docs", track=False)
    message = str(caught.value)
    assert "incoming/docs/**/*.py (ingest.file_glob='**/*.py' on the directory)" in message
    assert "'incoming/docs/**/*.txt'" in message, "the message says how to name the files"


def test_the_batch_reader_reports_the_glob_for_a_directory_a_file_and_a_pattern(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "m.py").write_text("x = 1\n")
    files, applied = drift.batch_files("d", "**/*.py", tmp_path)
    assert files == [tmp_path / "d" / "m.py"] and applied == "d/**/*.py (ingest.file_glob='**/*.py' on the directory)"
    assert drift.batch_files("d/m.py", "**/*.py", tmp_path)[1] == "d/m.py (one file)"
    files, applied = drift.batch_files("d/*.py", "**/*.txt", tmp_path)
    assert files == [tmp_path / "d" / "m.py"] and applied == "d/*.py (a glob)"
