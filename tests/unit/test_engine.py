"""The data stages' jobs (ingest's splits, validate's, dedup's and tokenize's shards): a process pool by default, Ray
(local or a cluster at RAY_ADDRESS) on request, with byte-identical outputs either way, on a real two-node Ray cluster too."""

import hashlib
import json
import random

import pytest

from llmops.data import engine
from llmops.params.dedup import DedupConfig
from llmops.params.ingest import IngestConfig
from llmops.params.model import ModelConfig
from llmops.params.tokenize import TokenizeConfig
from llmops.params.validate import ValidateConfig
from tasks import dedup, ingest, tokenize, validate

from ..conftest import perturb, project_paths, random_document

pytestmark = pytest.mark.unit


def square(x: int) -> int:
    return x * x


def frozen_objects(_: int) -> int:
    import gc

    return gc.get_freeze_count()


def node_of(seconds: float) -> str:
    import time

    import ray

    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id()


def test_process_pool_results_come_back_in_job_order(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("LLMOPS_DATA_ENGINE", raising=False)
    assert engine.map_jobs(square, [(i,) for i in range(20)], workers=2) == [i * i for i in range(20)]


def test_pool_workers_inherit_the_drivers_heap_frozen_and_the_driver_unfreezes_after(monkeypatch):
    """The workers fork with the driver's objects in GC's permanent generation (no copy-on-write from their
    collections); the driver collects them again once the pool is done, also after a nested pool."""
    import gc

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("LLMOPS_DATA_ENGINE", raising=False)
    assert gc.get_freeze_count() == 0
    outer = engine.imap_jobs(frozen_objects, [(i,) for i in range(3)], workers=2)
    first = next(outer)
    inner = engine.map_jobs(frozen_objects, [(i,) for i in range(2)], workers=2)
    assert gc.get_freeze_count() > 0  # the outer pool is still open
    rest = list(outer)
    assert min([first, *rest, *inner]) > 1000  # pytest, pyarrow, llmops: thousands of objects frozen in each worker
    assert gc.get_freeze_count() == 0


def test_an_unknown_engine_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LLMOPS_DATA_ENGINE", "spark")
    with pytest.raises(ValueError, match="LLMOPS_DATA_ENGINE='spark': expected processes or ray"):
        engine.map_jobs(square, [(1,)])


def _corpus(root, vocabulary):
    """A JSONL corpus (near and exact duplicates, an empty text, control characters, a malformed line, blank lines)."""
    rng = random.Random(5)
    texts = [random_document(rng, vocabulary, 300) for _ in range(60)]
    texts += [perturb(rng, texts[i], vocabulary, 0.02) for i in range(10)] + texts[:3] + ["", "\x00\x01 bad"]
    lines = [json.dumps({"id": f"doc{i}", "text": t}) for i, t in enumerate(texts)]
    lines[40:40] = ["", "{not json"]
    (root / "corpus.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")


def _stages(root) -> dict[str, str]:
    """The four data stages on many small splits and shards; the md5 of every file they write."""
    paths = project_paths(root)
    ingested = ingest.run(IngestConfig(source="corpus.jsonl", split_bytes=20_000, shard_max_bytes=15_000, workers=2), paths).metrics
    assert ingested["splits"] >= 4 and ingested["records_with_ingest_error"] == 1 and ingested["blank_lines"] == 2
    validate.run(ValidateConfig(min_pass_rate=0.5, shard_max_bytes=15_000, workers=2), paths)
    dedup.run(DedupConfig(workers=2, shard_max_bytes=15_000), paths)
    tokenize.run(TokenizeConfig(vocab_size=400, workers=2), ModelConfig(), paths)
    out = {}
    for folder in (paths.raw, paths.validated, paths.quarantine, paths.dedup, paths.duplicates, paths.tokens, paths.tokenizer):
        for p in sorted(folder.iterdir()):
            out[f"{folder.name}/{p.name}"] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


def test_the_four_data_stages_on_a_two_node_ray_cluster_match_the_local_run_byte_for_byte(tmp_path, vocabulary, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    for name in ("local", "ray"):
        _corpus(tmp_path / name / "project", vocabulary)  # one folder name: records are labelled by it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("LLMOPS_DATA_ENGINE", raising=False)
    local = _stages(tmp_path / "local" / "project")
    assert len(list((tmp_path / "local" / "project" / "data" / "raw").glob("*.parquet"))) >= 8

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        on_ray = _stages(tmp_path / "ray" / "project")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert len(set(engine.map_jobs(node_of, [(0.5,)] * 6))) == 2  # jobs really ran on both nodes
        assert ray.is_initialized() and ray.get_runtime_context().gcs_address == cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert on_ray == local
    assert any(k.startswith("duplicates/") for k in local) and "dedup/minhash.npy" in local
    assert {"tokens/train-00000.bin", "tokens/val-00000.bin", "tokens/manifest.json", "tokenizer/tokenizer.json", "quarantine/part-00000.parquet"} <= set(local)
