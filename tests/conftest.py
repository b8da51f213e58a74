"""Shared fixtures: offline environment, no progress bars, and tiny corpora built in the test."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from llmops.params.paths import PathsConfig

from llmops.common.env import OFFLINE as OFFLINE_ENV

os.environ.update(OFFLINE_ENV)
os.environ["LLMOPS_PROGRESS"] = "0"

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _own_mlflow_store():
    """Each module starts without MLFLOW_TRACKING_URI and leaves MLflow's URI as it found it: stages tracked in-process
    point MLflow (and, through mlflow.set_tracking_uri, the environment) at their project's store, which must not leak
    into later tests."""
    from mlflow.tracking._tracking_service import utils

    saved_env, saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None), utils._tracking_uri
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if saved_env is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved_env
    utils._tracking_uri = saved_uri


def project_paths(root: Path, **overrides: str) -> PathsConfig:
    """params.yaml `paths` (defaults plus `overrides`) resolved against `root`, as the runner hands them to a stage."""
    return PathsConfig(**overrides).under(root)


def store_of(params):
    """The registry store of loaded params (its tracking URI and download folder under the params' root)."""
    from llmops.registry.store import Store

    return Store.of(params.tracking, params.paths)


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def random_document(rng: random.Random, vocabulary: list[str], words: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def perturb(rng: random.Random, text: str, vocabulary: list[str], fraction: float) -> str:
    """Replace `fraction` of the words at random positions: a planted near duplicate."""
    words = text.split()
    for pos in rng.sample(range(len(words)), max(1, int(len(words) * fraction))):
        words[pos] = rng.choice(vocabulary) + "x"
    return " ".join(words)


@pytest.fixture
def vocabulary() -> list[str]:
    rng = random.Random(7)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
