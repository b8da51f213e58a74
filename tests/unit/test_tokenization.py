import json
import random

import numpy as np
import pyarrow as pa
import pytest

from llmops.common.errors import DataError
from llmops.common.fingerprints import directory_digest
from llmops.common.io import RECORD_SCHEMA, write_records
from llmops.data import tokenizer as tokenization
from llmops.params.model import ModelConfig
from llmops.params.tokenize import TokenizeConfig
from tasks import tokenize

from ..conftest import ROOT, project_paths

pytestmark = pytest.mark.unit


def code_documents(n: int) -> list[str]:
    files = sorted((ROOT / "llmops").rglob("*.py"))
    rng = random.Random(3)
    return [files[i % len(files)].read_text() + f"\n# variant {i} {rng.random()}\n" for i in range(n)]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    texts = code_documents(40)
    ids = [f"d{i}" for i in range(len(texts))]
    table = pa.table({"id": ids, "text": texts, "source": ids, "meta": ["{}"] * len(texts), "ingest_error": [None] * len(texts)}, schema=RECORD_SCHEMA)
    write_records(root / "dedup", table, shard_max_bytes=1 << 30)
    cfg = TokenizeConfig(vocab_size=400, val_fraction=0.1)
    result = tokenize.run(cfg, ModelConfig(), project_paths(root, dedup="dedup", tokens="tokens", tokenizer="tokenizer"))
    return root, cfg, texts, result


def test_split_by_document_is_deterministic_and_holds_out_about_val_fraction():
    ids = [f"doc-{i}" for i in range(2000)]
    held_out = [tokenization.is_validation_doc(i, 0.1, seed=0) for i in ids]
    assert held_out == [tokenization.is_validation_doc(i, 0.1, seed=0) for i in ids]
    assert 0.07 < sum(held_out) / len(ids) < 0.13


def test_packed_arrays_have_one_eos_per_document_and_decode_back(tokenized):
    root, _, texts, result = tokenized
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    train = np.fromfile(root / "tokens" / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(root / "tokens" / "val.bin", dtype=meta["dtype"])
    eos = meta["eos_token_id"]
    assert int((train == eos).sum()) == meta["train_docs"] and int((val == eos).sum()) == meta["val_docs"]
    assert meta["train_docs"] + meta["val_docs"] == len(texts)
    assert train.size == meta["train_tokens"] and result.metrics["tokens"] == train.size + val.size
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    first_doc = train[: int(np.argmax(train == eos))]
    assert tokenizer.decode(first_doc.tolist()) in texts


def test_tokenizer_digest_in_meta_is_the_cache_key_of_the_arrays(tokenized):
    root, _, _, _ = tokenized
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == directory_digest(root / "tokenizer", algorithm="sha256")


def test_training_the_tokenizer_twice_gives_the_same_vocabulary(tokenized):
    _, cfg, texts, _ = tokenized
    first = tokenization.train_bpe(texts, cfg).get_vocab()
    second = tokenization.train_bpe(texts, cfg).get_vocab()
    assert first == second and len(first) == cfg.vocab_size


def test_reference_stats_cover_every_document_and_token(tokenized):
    root, _, _, _ = tokenized
    stats = json.loads((root / "tokens" / "reference_stats.json").read_text())
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    assert sum(stats["doc_length_histogram"]) == meta["train_docs"]
    assert len(stats["doc_length_bin_edges"]) == len(stats["doc_length_histogram"]) + 1
    assert sum(stats["unigram_counts"]) == meta["train_tokens"]
    assert stats["unk_rate"] == 0.0 and 0.0 <= stats["byte_fallback_rate"] < 0.01


def test_base_model_tokenizer_must_exist_locally(tmp_path):
    with pytest.raises(DataError, match="model.base="):
        tokenization.load_base_tokenizer(str(tmp_path / "no-such-model"))


def test_base_model_tokenizer_is_used_when_set(tokenized, tmp_path):
    root, cfg, _, _ = tokenized
    result = tokenize.run(cfg, ModelConfig(base=str(root / "tokenizer")), project_paths(tmp_path, dedup=str(root / "dedup"), tokens="tokens", tokenizer="tok"))
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["tokenizer_source"] == str(root / "tokenizer")
    assert result.metrics["vocab_size"] == cfg.vocab_size


def test_special_token_text_inside_a_document_is_not_a_document_boundary(tokenized):
    root, _, _, _ = tokenized
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    packed, lengths = tokenization.encode_and_pack(tokenizer, ["a <|endoftext|> b", "c"], batch_docs=8, desc="t")
    assert int((packed == tokenizer.eos_token_id).sum()) == 2
    assert tokenizer.decode(packed[: lengths[0]].tolist()) == "a <|endoftext|> b"


def _tokenize(root, texts, shard_max_bytes, **cfg):
    ids = [f"d{i}" for i in range(len(texts))]
    table = pa.table({"id": ids, "text": texts, "source": ids, "meta": ["{}"] * len(texts), "ingest_error": [None] * len(texts)}, schema=RECORD_SCHEMA)
    write_records(root / "dedup", table, shard_max_bytes=shard_max_bytes)
    config = TokenizeConfig(vocab_size=400, val_fraction=0.1, batch_docs=3, **cfg)
    return tokenize.run(config, ModelConfig(), project_paths(root, dedup="dedup", tokens="tokens", tokenizer="tokenizer"))


def test_the_outputs_do_not_depend_on_how_the_records_are_sharded(tmp_path):
    texts = code_documents(30)
    one = _tokenize(tmp_path / "one", texts, 1 << 30)
    many = _tokenize(tmp_path / "many", texts, 4_000)
    assert len(list((tmp_path / "many" / "dedup").glob("*.parquet"))) > 5
    for name in ("train.bin", "val.bin", "meta.json", "reference_stats.json"):
        assert (tmp_path / "one" / "tokens" / name).read_bytes() == (tmp_path / "many" / "tokens" / name).read_bytes(), name
    assert directory_digest(tmp_path / "one" / "tokenizer") == directory_digest(tmp_path / "many" / "tokenizer")
    assert {k: v for k, v in one.metrics.items() if not k.endswith("_s")} == {k: v for k, v in many.metrics.items() if not k.endswith("_s")}


def test_the_bpe_learns_from_a_bounded_deterministic_sample_and_says_so(tmp_path):
    texts = code_documents(30)
    budget = sum(len(t.encode()) for t in texts) // 3
    first = _tokenize(tmp_path / "a", texts, 4_000, train_sample_bytes=budget)
    again = _tokenize(tmp_path / "b", list(texts), 50_000, train_sample_bytes=budget)
    meta = json.loads((tmp_path / "a" / "tokens" / "meta.json").read_text())
    assert 0 < meta["tokenizer_train_bytes"] <= budget and meta["tokenizer_train_docs"] < meta["train_docs"]
    assert first.metrics["tokenizer_train_docs"] == again.metrics["tokenizer_train_docs"]
    assert directory_digest(tmp_path / "a" / "tokenizer") == directory_digest(tmp_path / "b" / "tokenizer")
    # every document is still encoded: the sample only decides what the BPE learns from
    assert meta["train_docs"] + meta["val_docs"] == len(texts)


TOKEN_OUTPUTS = ("train.bin", "val.bin", "meta.json", "reference_stats.json")


def test_one_worker_and_two_worker_processes_write_the_same_bytes_over_many_shards(tmp_path):
    texts = code_documents(24)
    one = _tokenize(tmp_path / "one", texts, 3_000, workers=1)
    two = _tokenize(tmp_path / "two", texts, 3_000, workers=2)
    assert len(list((tmp_path / "two" / "dedup").glob("*.parquet"))) > 5
    for name in TOKEN_OUTPUTS:
        assert (tmp_path / "one" / "tokens" / name).read_bytes() == (tmp_path / "two" / "tokens" / name).read_bytes(), name
    assert {k: v for k, v in one.metrics.items() if not k.endswith("_s")} == {k: v for k, v in two.metrics.items() if not k.endswith("_s")}
    assert sorted(p.name for p in (tmp_path / "two" / "tokens").iterdir()) == sorted([".llmops-output", *TOKEN_OUTPUTS])  # no part files left


def test_the_sharded_encode_writes_what_one_in_process_encode_of_the_documents_writes(tmp_path):
    texts = code_documents(24)
    _tokenize(tmp_path, texts, 3_000, workers=2)
    tokenizer = tokenization.load_saved_tokenizer(tmp_path / "tokenizer")
    ids = [f"d{i}" for i in range(len(texts))]
    is_val = tokenization.validation_mask(ids, TokenizeConfig(vocab_size=400, val_fraction=0.1))
    assert 0 < is_val.sum() < len(texts)
    with open(tmp_path / "train.bin", "wb") as train, open(tmp_path / "val.bin", "wb") as val:
        encoded = tokenization.encode_stream(tokenizer, [(0, texts)], is_val, {False: train, True: val})
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "tokens" / name).read_bytes() == (tmp_path / name).read_bytes(), name
    stats = json.loads((tmp_path / "tokens" / "reference_stats.json").read_text())
    assert stats["unigram_counts"] == encoded.counts.tolist() and stats["docs"] == len(encoded.lengths[False])


def test_pool_fill_is_the_busy_share_of_one_thread_workers_taking_shards_in_order():
    assert tokenization.pool_fill([10, 10], workers=2) == 1.0
    assert tokenization.pool_fill([10, 10, 10], workers=2) == 0.75  # the third shard runs while one worker idles
    assert tokenization.pool_fill([10, 5, 5], workers=2) == 1.0
    assert tokenization.pool_fill([10], workers=4) == 0.25
