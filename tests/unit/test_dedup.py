import random

import pyarrow as pa
import pytest

from llmops.data import minhash
from tasks import dedup
from llmops.params.dedup import DedupConfig
from llmops.common.io import RECORD_SCHEMA, read_records, write_records

from ..conftest import perturb, project_paths, random_document

pytestmark = pytest.mark.unit

ORIGINALS = 120
PLANTED = 30


@pytest.fixture
def planted_corpus(vocabulary):
    """120 unrelated documents, then 30 copies of some of them with 2% of their words changed."""
    rng = random.Random(11)
    originals = [random_document(rng, vocabulary, 400) for _ in range(ORIGINALS)]
    sources = rng.sample(range(ORIGINALS), PLANTED)
    copies = [perturb(rng, originals[i], vocabulary, 0.02) for i in sources]
    return originals + copies, {ORIGINALS + k: src for k, src in enumerate(sources)}


@pytest.mark.parametrize("engine", ["rensa", "datasketch"])
def test_planted_near_duplicates_are_found_with_high_recall_and_precision(planted_corpus, engine):
    texts, planted = planted_corpus
    removed = minhash.find_duplicates(DedupConfig(engine=engine, workers=1), texts)
    found = {i for i, (_, kind, _) in removed.items() if kind == "near"}
    recall = len(found & set(planted)) / len(planted)
    precision = len(found & set(planted)) / len(found)
    assert recall >= 0.9, f"{engine}: recall {recall:.2f}"
    assert precision == 1.0, f"{engine}: removed originals {sorted(found - set(planted))}"
    for i in found & set(planted):
        kept, _, similarity = removed[i]
        assert kept == planted[i]  # the earlier original is the one kept
        assert similarity >= 0.7


def test_signatures_from_two_worker_processes_match_one_process(planted_corpus):
    texts, _ = planted_corpus
    one = minhash.find_duplicates(DedupConfig(workers=1), texts)
    two = minhash.find_duplicates(DedupConfig(workers=2), texts)
    assert one == two


def test_exact_duplicates_ignore_trailing_whitespace_and_blank_edges():
    texts = ["def f():\n    return 1\n", "\n\ndef f():   \n    return 1", "def g():\n    return 2\n"]
    removed = minhash.find_duplicates(DedupConfig(workers=1), texts)
    assert removed == {1: (0, "exact", 1.0)}


def test_short_and_distinct_documents_are_all_kept():
    texts = ["a", "b c", "x = 1", "import os"]
    assert minhash.find_duplicates(DedupConfig(workers=1), texts) == {}


def test_lsh_bands_divide_the_permutations():
    for threshold in (0.5, 0.7, 0.9):
        bands = minhash.lsh_bands(threshold, 128)
        assert 128 % bands == 0 and 1 < bands < 128


def test_stage_writes_kept_records_and_a_report_naming_the_kept_record(tmp_path, planted_corpus):
    texts, planted = planted_corpus
    texts = texts + [texts[0]]  # one exact duplicate as well
    ids = [f"doc{i}" for i in range(len(texts))]
    table = pa.table({"id": ids, "text": texts, "source": ids, "meta": ["{}"] * len(texts), "ingest_error": [None] * len(texts)}, schema=RECORD_SCHEMA)
    write_records(tmp_path / "validated", table, shard_max_bytes=50_000)
    result = dedup.run(DedupConfig(workers=1, shard_max_bytes=50_000), project_paths(tmp_path, validated="validated", dedup="dedup", duplicates="dups"))
    report = read_records(tmp_path / "dups").to_pylist()
    by_id = {r["id"]: r for r in report}
    assert by_id[ids[-1]]["duplicate_of"] == "doc0" and by_id[ids[-1]]["kind"] == "exact"
    some_copy, its_source = next(iter(planted.items()))
    assert by_id[f"doc{some_copy}"]["duplicate_of"] == f"doc{its_source}"
    kept = read_records(tmp_path / "dedup").num_rows
    m = result.metrics
    assert m["docs_in"] == kept + m["exact_duplicates"] + m["near_duplicates"] == len(texts)
    assert m["exact_duplicates"] == 1 and m["near_duplicates"] == len(report) - 1
    assert m["bytes_removed"] == sum(len(r["text"].encode()) for r in report)


def test_the_stage_gives_byte_identical_outputs_with_one_or_two_workers_over_many_shards(tmp_path, planted_corpus):
    import hashlib

    texts, _ = planted_corpus
    texts = texts + texts[:5]
    ids = [f"doc{i}" for i in range(len(texts))]
    table = pa.table({"id": ids, "text": texts, "source": ids, "meta": ["{}"] * len(texts), "ingest_error": [None] * len(texts)}, schema=RECORD_SCHEMA)
    write_records(tmp_path / "validated", table, shard_max_bytes=20_000)
    outputs = []
    for workers in (1, 2):
        paths = project_paths(tmp_path, validated="validated", dedup=f"dedup{workers}", duplicates=f"dups{workers}")
        metrics = dedup.run(DedupConfig(workers=workers, shard_max_bytes=20_000), paths).metrics
        files = {f"{d.name[:-1]}/{p.name}": hashlib.md5(p.read_bytes()).hexdigest() for d in (paths.dedup, paths.duplicates) for p in sorted(d.iterdir())}
        outputs.append((metrics, files))
    assert len(list((tmp_path / "validated").glob("*.parquet"))) > 10  # many shards, so both passes really fan out
    assert outputs[0] == outputs[1]
    assert "dedup/minhash.npy" in outputs[0][1] and len(outputs[0][1]) > 5


def test_the_kept_documents_signatures_are_written_beside_them(tmp_path, planted_corpus):
    import json

    import numpy as np

    texts, _ = planted_corpus
    ids = [f"doc{i}" for i in range(len(texts))]
    table = pa.table({"id": ids, "text": texts, "source": ids, "meta": ["{}"] * len(texts), "ingest_error": [None] * len(texts)}, schema=RECORD_SCHEMA)
    write_records(tmp_path / "validated", table, shard_max_bytes=50_000)
    cfg = DedupConfig(workers=1)
    dedup.run(cfg, project_paths(tmp_path, validated="validated", dedup="dedup", duplicates="dups"))
    kept = read_records(tmp_path / "dedup")
    sigs = np.load(tmp_path / "dedup" / "minhash.npy")
    meta = json.loads((tmp_path / "dedup" / "minhash.json").read_text())
    assert sigs.shape == (kept.num_rows, cfg.num_perm) and meta["rows"] == kept.num_rows and meta["engine"] == cfg.engine
    first = kept.column("text")[0].as_py()
    assert np.array_equal(sigs[0], minhash.digest_matrix(cfg.engine, [first], cfg.shingle_words, cfg.num_perm, cfg.seed)[0])


def test_connected_components_join_chains_and_keep_the_lowest_position():
    import numpy as np

    roots = minhash.clusters_keep_first(6, np.array([[3, 5], [1, 3], [2, 4]]))
    assert roots.tolist() == [0, 1, 2, 1, 2, 1]


def test_the_stage_on_disk_signatures_removes_what_the_in_memory_path_removes(tmp_path, planted_corpus):
    """The stage keeps signatures on disk (SignatureColumns) and its removals arrive as arrays; find_duplicates holds
    everything in memory. Both name the same record in each duplicate's place, including an exact duplicate of a
    record that is itself a near duplicate (it names that record, which was removed too)."""
    texts, planted = planted_corpus
    copy, source = next(iter(planted.items()))
    texts = texts + [texts[copy]]  # an exact duplicate of a near duplicate
    ids = [f"doc{i}" for i in range(len(texts))]
    table = pa.table({"id": ids, "text": texts, "source": ids, "meta": ["{}"] * len(texts), "ingest_error": [None] * len(texts)}, schema=RECORD_SCHEMA)
    write_records(tmp_path / "validated", table, shard_max_bytes=20_000)
    cfg = DedupConfig(workers=2, shard_max_bytes=20_000)
    dedup.run(cfg, project_paths(tmp_path, validated="validated", dedup="dedup", duplicates="dups"))
    report = {r["id"]: (r["duplicate_of"], r["kind"], r["similarity"]) for r in read_records(tmp_path / "dups").to_pylist()}
    expected = {ids[p]: (ids[k], kind, sim) for p, (k, kind, sim) in minhash.find_duplicates(cfg, texts).items()}
    assert report == expected
    assert report[ids[-1]][:2] == (ids[copy], "exact") and report[ids[copy]][:2] == (ids[source], "near")
    assert not (tmp_path / "dedup" / ".index").exists()


def test_signatures_on_disk_give_the_bands_and_similarities_of_the_matrix(tmp_path):
    import numpy as np

    rng = np.random.default_rng(3)
    sigs = rng.integers(0, 4, size=(50, 16), dtype=np.uint32)  # few values, so bands collide and pairs agree in part
    store = minhash.SignatureColumns(tmp_path, 50, 16)
    store.write(0, sigs[:20])
    store.write(20, sigs[20:])
    assert np.array_equal(store.rows(0, 50), sigs) and np.array_equal(store.columns(4, 8), sigs[:, 4:8])
    positions = np.arange(0, 50, 2)
    pairs = np.concatenate(list(minhash.band_pair_chunks(sigs, positions, 1, 2)))
    assert len(pairs) and np.array_equal(np.concatenate(list(minhash.band_pair_chunks(store, positions, 1, 2))), pairs)
    assert np.array_equal(store.similarity(pairs), minhash.similarity(sigs, pairs))


def test_small_candidate_and_verification_chunks_give_the_same_duplicates(tmp_path, planted_corpus, monkeypatch):
    texts, _ = planted_corpus
    texts = texts + texts[:4]
    cfg = DedupConfig(workers=1)
    whole = minhash.find_duplicates(cfg, texts)
    monkeypatch.setattr(minhash, "CANDIDATE_CHUNK_PAIRS", 2)
    monkeypatch.setattr(minhash, "VERIFY_COLUMN_PAIRS", 3)
    ids = [f"doc{i}" for i in range(len(texts))]
    table = pa.table({"id": ids, "text": texts, "source": ids, "meta": ["{}"] * len(texts), "ingest_error": [None] * len(texts)}, schema=RECORD_SCHEMA)
    write_records(tmp_path / "validated", table, shard_max_bytes=50_000)
    dedup.run(cfg, project_paths(tmp_path, validated="validated", dedup="dedup", duplicates="dups"))
    report = {r["id"]: (r["duplicate_of"], r["kind"], r["similarity"]) for r in read_records(tmp_path / "dups").to_pylist()}
    assert report == {ids[p]: (ids[k], kind, sim) for p, (k, kind, sim) in whole.items()}
    assert minhash.find_duplicates(cfg, texts) == whole and sum(kind == "near" for _, kind, _ in whole.values()) > PLANTED // 2


def _ascii_word_shingles(text: str, n: int) -> set[bytes]:
    """The shingles shingle_hashes hashes, as byte strings: words are runs of bytes that are not ASCII whitespace."""
    import re

    words = re.split(rb"[ \t\n\v\f\r]+", text.encode("utf-8", "surrogatepass").strip(b" \t\n\v\f\r"))
    words = [w for w in words if w]
    if len(words) < n:
        return {b" ".join(words)} if words else set()
    return {b" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _per_doc(hashes, offsets):
    return [set(hashes[int(a) : int(b)].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.mark.parametrize("n", [1, 5, 12])
def test_shingle_hashes_are_one_per_distinct_word_ngram_without_collisions(vocabulary, n):
    rng = random.Random(5)
    texts = [random_document(rng, vocabulary, rng.randint(0, 300)) for _ in range(60)]
    texts += ["", "  \n\t ", "one", "two words", "é ü 漢字 \U0001f600 four", "a b c d e f", "x\x0by\x0cz\rw\nv"]
    hashes, offsets = minhash.shingle_hashes(texts, n)
    assert hashes.dtype.name == "uint64" and len(offsets) == len(texts) + 1 and offsets[-1] == len(hashes)
    per_doc = _per_doc(hashes, offsets)
    for text, got in zip(texts, per_doc):
        assert len(got) == len(_ascii_word_shingles(text, n)), repr(text[:60])
    # Across documents too: equal shingles hash equally, different ones differently.
    all_shingles = set().union(*(_ascii_word_shingles(t, n) for t in texts))
    assert len(set().union(*per_doc)) == len(all_shingles)


def test_a_documents_shingle_hashes_do_not_depend_on_its_neighbours_or_the_input_form():
    texts = ["alpha beta gamma delta epsilon zeta", "eta theta", "iota kappa lambda mu nu xi omicron pi", "  rho  "]
    alone = [_per_doc(*minhash.shingle_hashes([t], 3))[0] for t in texts]
    assert _per_doc(*minhash.shingle_hashes(texts, 3)) == alone
    assert alone[1] and len(alone[1]) == 1 and len(alone[3]) == 1  # fewer words than a shingle: one shingle of them all
    chunked = pa.chunked_array([texts[:2], texts[2:]])
    for array in (pa.array(texts), pa.array(texts, pa.large_string()), pa.array(["pad"] + texts).slice(1), chunked):
        assert _per_doc(*minhash.shingle_hashes(array, 3)) == alone
    with pytest.raises(TypeError, match="Arrow type int64"):
        minhash.shingle_hashes(pa.array([1, 2]), 3)
    # Any run of ASCII whitespace separates words the same way; word order and content matter.
    assert _per_doc(*minhash.shingle_hashes(["alpha\tbeta\n\n gamma\r\ndelta  epsilon zeta\n"], 3))[0] == alone[0]
    swapped = _per_doc(*minhash.shingle_hashes(["beta alpha gamma delta epsilon zeta"], 3))[0]
    assert len(swapped) == 4 and len(swapped & alone[0]) == 2  # only "gamma delta epsilon" and "delta epsilon zeta" remain
    assert not _per_doc(*minhash.shingle_hashes(["", " \n "], 3))[0]


def test_shingle_hashes_are_the_same_whatever_the_window_the_bytes_are_hashed_in(monkeypatch, vocabulary):
    rng = random.Random(8)
    texts = [random_document(rng, vocabulary, 200) for _ in range(20)]
    whole = minhash.shingle_hashes(texts, 5)
    monkeypatch.setattr(minhash, "WINDOW_BYTES", 64)  # many windows per document, each cut after whitespace
    windowed = minhash.shingle_hashes(texts, 5)
    assert all((a == b).all() for a, b in zip(whole, windowed))
    # Words longer than a window (no whitespace: base64, minified code) are cut where their own document puts them.
    blobs = [("ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 6)[:150], "ab cd", "Z" * 100 + " tail", "x" * 64]
    alone = [_per_doc(*minhash.shingle_hashes([b], 1))[0] for b in blobs]
    assert [len(h) for h in alone] == [3, 2, 3, 1]
    assert _per_doc(*minhash.shingle_hashes(blobs, 1)) == alone
    assert _per_doc(*minhash.shingle_hashes(blobs[::-1], 1)) == alone[::-1]


def test_signatures_saved_with_another_shingle_format_are_not_reused(tmp_path):
    import json

    import numpy as np

    cfg = DedupConfig(workers=1)
    np.save(tmp_path / minhash.SIGNATURES_FILE, np.zeros((3, cfg.num_perm), dtype=np.uint32))
    meta = {**minhash.signature_settings(cfg), "rows": 3}
    (tmp_path / minhash.SIGNATURES_META).write_text(json.dumps(meta))
    assert minhash.load_signatures(tmp_path, cfg, 3) is not None
    (tmp_path / minhash.SIGNATURES_META).write_text(json.dumps({**meta, "shingles": "strings"}))
    assert minhash.load_signatures(tmp_path, cfg, 3) is None
    (tmp_path / minhash.SIGNATURES_META).write_text(json.dumps({k: v for k, v in meta.items() if k != "shingles"}))
    assert minhash.load_signatures(tmp_path, cfg, 3) is None


@pytest.mark.parametrize("text", ["", " ", "\t\n", "\x1c", "\u3000", "a", " a ", "\xa0b"])
def test_has_words_is_whether_str_split_finds_a_word(text):
    assert minhash.has_words(text) == bool(text.split())


@pytest.mark.parametrize("engine", ["rensa", "datasketch"])
def test_signatures_are_the_same_whatever_the_text_shingled_at_once(monkeypatch, planted_corpus, engine):
    texts, _ = planted_corpus
    texts = texts[:40] + ["", "short", " ".join(texts[40:46])]  # the last one longer than a batch: alone
    whole = minhash.digest_matrix(engine, texts, 5, 64, 1)
    monkeypatch.setattr(minhash, "DIGEST_BATCH_BYTES", 12_000)  # about 4 documents at a time, the long one alone
    assert (minhash.digest_matrix(engine, texts, 5, 64, 1) == whole).all()
    assert (minhash.digest_matrix(engine, pa.array(texts), 5, 64, 1) == whole).all()
    assert whole.shape == (len(texts), 64) and len({row.tobytes() for row in whole}) == len(texts)
