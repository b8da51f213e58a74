import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmops.common.errors import DataError
from llmops.common.fingerprints import directory_digest, file_sha256
from llmops.common.io import RECORD_SCHEMA, record_shards, write_records
from llmops.data import tokenizer as tokenization
from llmops.data.token_shards import MANIFEST, TokenShards, load_manifest
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


def split_bytes(tokens_dir, split: str) -> bytes:
    """A split's token shards concatenated in manifest order: the bytes of the split's flat token array."""
    return b"".join((tokens_dir / entry["file"]).read_bytes() for entry in load_manifest(tokens_dir)["splits"][split])


def test_split_by_document_is_deterministic_and_holds_out_about_val_fraction():
    ids = [f"doc-{i}" for i in range(2000)]
    held_out = [tokenization.is_validation_doc(i, 0.1, seed=0) for i in ids]
    assert held_out == [tokenization.is_validation_doc(i, 0.1, seed=0) for i in ids]
    assert 0.07 < sum(held_out) / len(ids) < 0.13


def test_packed_arrays_have_one_eos_per_document_and_decode_back(tokenized):
    root, _, texts, result = tokenized
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    train = TokenShards(root / "tokens", "train")[:]
    val = TokenShards(root / "tokens", "val")[:]
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
    for split in ("train", "val"):
        assert split_bytes(tmp_path / "one" / "tokens", split) == split_bytes(tmp_path / "many" / "tokens", split), split
    for name in ("meta.json", "reference_stats.json"):
        assert (tmp_path / "one" / "tokens" / name).read_bytes() == (tmp_path / "many" / "tokens" / name).read_bytes(), name
    assert len(load_manifest(tmp_path / "one" / "tokens")["splits"]["train"]) == 1 < len(load_manifest(tmp_path / "many" / "tokens")["splits"]["train"])
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


def test_one_worker_and_two_worker_processes_write_the_same_files_over_many_shards(tmp_path):
    texts = code_documents(24)
    one = _tokenize(tmp_path / "one", texts, 3_000, workers=1)
    two = _tokenize(tmp_path / "two", texts, 3_000, workers=2)
    assert len(list((tmp_path / "two" / "dedup").glob("*.parquet"))) > 5
    names = sorted(p.name for p in (tmp_path / "two" / "tokens").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one" / "tokens").iterdir())
    for name in names:
        assert (tmp_path / "one" / "tokens" / name).read_bytes() == (tmp_path / "two" / "tokens" / name).read_bytes(), name
    assert {k: v for k, v in one.metrics.items() if not k.endswith("_s")} == {k: v for k, v in two.metrics.items() if not k.endswith("_s")}


def test_the_manifest_lists_exactly_the_shard_files_present_none_empty_with_counts_that_add_up_to_meta(tmp_path):
    _tokenize(tmp_path, code_documents(24), 3_000, workers=2)
    tokens_dir = tmp_path / "tokens"
    manifest = load_manifest(tokens_dir)
    meta = json.loads((tokens_dir / "meta.json").read_text())
    listed = [entry for split in ("train", "val") for entry in manifest["splits"][split]]
    on_disk = {p.name for p in tokens_dir.iterdir()} - {".llmops-output", MANIFEST, "meta.json", "reference_stats.json"}
    assert sorted(on_disk) == sorted(entry["file"] for entry in listed)  # no part or scratch files left either
    assert manifest["dtype"] == meta["dtype"]
    for split in ("train", "val"):
        entries = manifest["splits"][split]
        assert [entry["file"] for entry in entries] == [f"{split}-{i:05d}.bin" for i in range(len(entries))]
        assert sum(entry["tokens"] for entry in entries) == meta[f"{split}_tokens"]
        assert sum(entry["docs"] for entry in entries) == meta[f"{split}_docs"]
    for entry in listed:
        assert entry["tokens"] > 0 and entry["docs"] > 0
        assert (tokens_dir / entry["file"]).stat().st_size == entry["tokens"] * np.dtype(meta["dtype"]).itemsize
        assert file_sha256(tokens_dir / entry["file"]) == entry["sha256"]
    # one shard per split for every dedup shard holding a document of that split: those without leave no empty file
    ids_per_shard = [pq.read_table(shard, columns=["id"]).column("id").to_pylist() for shard in record_shards(tmp_path / "dedup")]
    is_val = iter(tokenization.validation_mask([i for ids in ids_per_shard for i in ids], TokenizeConfig(vocab_size=400, val_fraction=0.1)))
    sides_per_shard = [{next(is_val) for _ in ids} for ids in ids_per_shard]
    assert len(manifest["splits"]["train"]) == sum(False in sides for sides in sides_per_shard)
    assert len(manifest["splits"]["val"]) == sum(True in sides for sides in sides_per_shard) < len(ids_per_shard)


def test_a_split_without_documents_has_no_shard_files_and_reads_as_empty(tmp_path):
    _tokenize(tmp_path, code_documents(1), 1 << 30)
    assert load_manifest(tmp_path / "tokens")["splits"]["val"] == []
    assert not list((tmp_path / "tokens").glob("val-*.bin"))
    assert len(TokenShards(tmp_path / "tokens", "val")) == 0 and TokenShards(tmp_path / "tokens", "val")[:].size == 0


def test_the_token_shards_concatenated_are_the_bytes_of_one_in_process_encode_of_the_documents(tmp_path):
    texts = code_documents(24)
    _tokenize(tmp_path, texts, 3_000, workers=2)
    tokenizer = tokenization.load_saved_tokenizer(tmp_path / "tokenizer")
    ids = [f"d{i}" for i in range(len(texts))]
    is_val = tokenization.validation_mask(ids, TokenizeConfig(vocab_size=400, val_fraction=0.1))
    assert 0 < is_val.sum() < len(texts)
    with open(tmp_path / "train.bin", "wb") as train, open(tmp_path / "val.bin", "wb") as val:
        encoded = tokenization.encode_stream(tokenizer, [(0, texts)], is_val, {False: train, True: val})
    assert split_bytes(tmp_path / "tokens", "train") == (tmp_path / "train.bin").read_bytes()
    assert split_bytes(tmp_path / "tokens", "val") == (tmp_path / "val.bin").read_bytes()
    stats = json.loads((tmp_path / "tokens" / "reference_stats.json").read_text())
    assert stats["unigram_counts"] == encoded.counts.tolist() and stats["docs"] == len(encoded.lengths[False])


def test_pool_fill_is_the_busy_share_of_one_thread_workers_taking_shards_in_order():
    assert tokenization.pool_fill([10, 10], workers=2) == 1.0
    assert tokenization.pool_fill([10, 10, 10], workers=2) == 0.75  # the third shard runs while one worker idles
    assert tokenization.pool_fill([10, 5, 5], workers=2) == 1.0
    assert tokenization.pool_fill([10], workers=4) == 0.25


def write_shards(tokens_dir, sizes: list[int], dtype: str = "uint16") -> np.ndarray:
    """Shards of consecutive token ids, `sizes` tokens each, as the train split of a manifest; returns all the ids."""
    tokens_dir.mkdir(parents=True, exist_ok=True)
    ids = np.arange(sum(sizes), dtype=dtype)
    entries, start = [], 0
    for i, size in enumerate(sizes):
        ids[start : start + size].tofile(tokens_dir / f"train-{i:05d}.bin")
        entries.append({"file": f"train-{i:05d}.bin", "tokens": size, "docs": 1, "sha256": file_sha256(tokens_dir / f"train-{i:05d}.bin")})
        start += size
    (tokens_dir / MANIFEST).write_text(json.dumps({"dtype": dtype, "splits": {"train": entries, "val": []}}))
    return ids


def test_token_shards_slice_across_shard_boundaries_like_one_array(tmp_path):
    ids = write_shards(tmp_path, [5, 1, 7, 3])
    shards = TokenShards(tmp_path, "train")
    assert len(shards) == ids.size
    for start in range(ids.size + 1):
        for stop in range(start, ids.size + 2):
            assert shards[start:stop].tolist() == ids[start:stop].tolist(), (start, stop)
    assert shards[:].tolist() == ids.tolist() and shards[-4:].tolist() == ids[-4:].tolist()


def test_token_blocks_over_shards_are_the_blocks_of_the_single_file_array(tmp_path):
    from llmops.training.data import TokenBlocks

    ids = write_shards(tmp_path, [37, 50, 13, 64])  # blocks of 16 cross every boundary but one
    ids.tofile(tmp_path / "single.bin")
    single = np.memmap(tmp_path / "single.bin", dtype=ids.dtype, mode="r")
    for seed, limit in ((None, 0), (7, 0), (None, 40)):
        sharded = TokenBlocks(TokenShards(tmp_path, "train"), 16, seed=seed, limit_tokens=limit)
        flat = TokenBlocks(single, 16, seed=seed, limit_tokens=limit)
        assert len(sharded) == len(flat) > 0
        for i in range(len(flat)):
            assert sharded[i]["input_ids"].tolist() == flat[i]["input_ids"].tolist(), (seed, i)


def test_a_missing_token_shard_is_a_data_error_naming_the_file(tmp_path):
    write_shards(tmp_path, [5, 6])
    (tmp_path / "train-00001.bin").unlink()
    with pytest.raises(DataError, match=r"train-00001\.bin: listed in .*manifest\.json but missing"):
        TokenShards(tmp_path, "train")


def test_a_truncated_token_shard_is_a_data_error_naming_the_file_and_sizes(tmp_path):
    write_shards(tmp_path, [5, 6])
    with open(tmp_path / "train-00000.bin", "r+b") as f:
        f.truncate(7)
    with pytest.raises(DataError, match=r"train-00000\.bin: 7 bytes, but .*manifest\.json lists 5 tokens of uint16 \(10 bytes\)"):
        TokenShards(tmp_path, "train")


def test_token_shards_without_a_manifest_say_to_run_tokenize(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json: not found; run the tokenize stage"):
        TokenShards(tmp_path, "train")
