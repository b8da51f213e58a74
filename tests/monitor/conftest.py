"""A tokenized micro project whose corpus is a hash-picked 80% of some stdlib packages (the other 20% is a same-distribution batch),
with a micro model trained on it for the perplexity check."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from llmops.params.load import load_params
from llmops.common.io import RECORD_SCHEMA, write_records
from llmops.data.sources import stdlib_root

from ..conftest import write_jsonl
from ..training.conftest import llmops, micro_params, write_params

PACKAGES = ("json", "email", "http", "urllib", "logging", "importlib", "concurrent/futures", "xml/etree", "asyncio")

PROSE = [
    "The river ran slowly past the old mill, and the children who lived in the village would gather on its banks every summer "
    "evening to watch the swallows dip low over the water. Nobody remembered when the mill had last turned its wheel.",
    "Margaret had always believed that a garden was a kind of conversation. She planted the roses in the spring, and in return "
    "they told her, through the colour of their leaves and the weight of their blooms, whether she had listened well enough.",
    "In the autumn the town held a fair in the square. There were stalls selling apples and honey, a man who played the fiddle "
    "badly but with great enthusiasm, and a fortune teller whose predictions were always, somehow, about the weather.",
    "He walked to the station in the rain, thinking about the letter in his pocket. It had taken him three weeks to write and "
    "would take her three minutes to read, and he was no longer sure that he wanted her to read it at all.",
    "The library was quiet except for the ticking of the clock above the desk. Rows of books stretched into the shadows, their "
    "spines faded by decades of afternoon sun, and the smell of paper and dust hung in the warm, still air.",
    "When the storm finally passed, the fishermen went down to the harbour to count their boats. Two had broken loose in the "
    "night and drifted onto the rocks, but the rest rode gently at their moorings as if nothing had happened.",
    "My grandmother kept a notebook of recipes that she had collected over sixty years. Some were written in pencil, some in "
    "ink, and a few in a handwriting nobody in the family could identify, with instructions that simply said: cook until done.",
    "The committee met on the first Tuesday of every month to discuss the state of the village hall. The roof leaked, the "
    "heating was unreliable, and the piano had not been tuned since before the war, yet the hall was always full on dance nights.",
]


# A deploy flow's load-test metrics (what it logs to MLflow): 4 clients x 40 tokens/s each.
LOAD_TEST = {"load.latency_p95_s": 1.0, "load.latency_p50_s": 0.8, "load.tokens_per_s": 160.0, "load.clients": 4.0}


def captured(i: int, *, refused: bool = False, latency_s: float = 0.8, tokens_out: int = 32, text: str = "def add(a, b):\n") -> dict:
    """One request record in serving's capture format (the shared contract of request capture and the monitor)."""
    return {
        "text": text, "id": f"req-{i}", "time": "2026-12-02T09:00:00Z", "model": "llmops-code", "model_version": "3",
        "route": "/v1/completions", "status": 429 if refused else 200, "refused": refused, "tokens_in": 7,
        "tokens_out": 0 if refused else tokens_out, "latency_s": 0.001 if refused else latency_s, "ttft_s": None if refused else 0.05,
    }  # fmt: skip


def pool_files() -> list[Path]:
    root = stdlib_root()
    return [p for pkg in PACKAGES for p in sorted((root / pkg).glob("*.py")) if p.stat().st_size > 500]


def in_batch(path: Path) -> bool:
    return int(hashlib.sha256(path.name.encode() + path.parent.name.encode()).hexdigest(), 16) % 5 == 0


@pytest.fixture(scope="session")
def monitored(tmp_path_factory) -> Path:
    """data/dedup + tokenize outputs + a micro pretrained model (monitor.model points at it), built once per session."""
    from tasks import tokenize

    root = tmp_path_factory.mktemp("monitored")
    train = [p for p in pool_files() if not in_batch(p)]
    rows = [{"id": f"stdlib/{p.parent.name}/{p.name}", "text": p.read_text(), "source": "stdlib", "meta": "{}", "ingest_error": None} for p in train]
    write_records(root / "data" / "dedup", pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), shard_max_bytes=16_000_000)
    params = micro_params(
        tokenize={"vocab_size": 512, "val_fraction": 0.1},
        pretrain={"token_budget": 4 * 32 * 60},
        evaluate={"seq_len": 32},
        monitor={"model": "models/pretrain", "perplexity_tokens": 4096},
        validate={"min_pass_rate": 0.5},
    )
    loaded = load_params(write_params(root, params))
    tokenize.run(loaded.tokenize, loaded.model, loaded.paths)
    llmops(root, "stage", "pretrain", "--no-track")
    return root


@pytest.fixture
def project(monitored, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the monitored project; MLflow tracks into its own sqlite file (set_tracking_uri also sets the env var)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    proj = tmp_path / "proj"
    shutil.copytree(monitored, proj)
    return proj


@pytest.fixture
def same_distribution_batch(tmp_path) -> Path:
    files = [p for p in pool_files() if in_batch(p)]
    return write_jsonl(tmp_path / "batch" / "same.jsonl", [{"id": f"new/{p.parent.name}/{p.name}", "text": p.read_text()} for p in files])


@pytest.fixture
def prose_batch(tmp_path) -> Path:
    return write_jsonl(tmp_path / "batch" / "prose.jsonl", [{"id": f"prose/{i}", "text": t} for i, t in enumerate(PROSE * 3)])
