"""A tokenized micro project (stdlib code, 300-token BPE, a 2-layer model) that training tests copy and train on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from llmops.params.load import load_params
from llmops.params.tokenize import TokenizeConfig
from llmops.common.io import RECORD_SCHEMA, write_records
from llmops.data.sources import stdlib_root
from llmops.training.runtime import COMPLETE_MARKER

from ..helpers import BIN, MICRO

MICRO_MOE = {**MICRO, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True}


def micro_params(**sections: dict) -> dict:
    """params.yaml for the micro project; `sections` override keys per section."""
    params = {
        "train": {"seed": 0, "save_every": 10, "keep_checkpoints": 2, "log_every": 1, "device": "cpu"},
        "pretrain": {
            "preset": "micro",
            "presets": {"micro": MICRO, "micro-moe": MICRO_MOE},
            "seq_len": 32,
            "batch_size": 4,
            "token_budget": 4 * 32 * 40,  # 40 steps
            "lr": 0.01,
            "warmup_steps": 2,
            "eval_tokens": 2048,
        },
        "finetune": {"max_seq_len": 256, "max_steps": 20, "batch_size": 4, "lr": 0.01, "max_eval_pairs": 20, "eval_fraction": 0.2},
    }
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    return params


def write_params(project: Path, params: dict) -> Path:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory) -> Path:
    """data/dedup (stdlib json + email modules) and its tokenize outputs, built once per session."""
    from tasks import tokenize

    root = tmp_path_factory.mktemp("tokenized")
    files = sorted((stdlib_root() / "json").glob("*.py")) + sorted((stdlib_root() / "email").glob("*.py"))[:12]
    rows = [{"id": f"stdlib/{p.parent.name}/{p.name}", "text": p.read_text(), "source": "stdlib", "meta": "{}", "ingest_error": None} for p in files]
    write_records(root / "data" / "dedup", pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), shard_max_bytes=16_000_000)
    params = load_params(write_params(root, micro_params()))
    cfg = TokenizeConfig(vocab_size=300, val_fraction=0.1)
    tokenize.run(cfg, params.model, params.paths)
    return root


@pytest.fixture
def project(tokenized, tmp_path) -> Path:
    """A fresh copy of the tokenized micro project to train in (cwd-relative paths, like the repo)."""
    proj = tmp_path / "proj"
    shutil.copytree(tokenized, proj)
    return proj


def llmops(project: Path, *args: str, check: bool = True, progress: bool = False, **popen) -> subprocess.CompletedProcess:
    env = os.environ | {"LLMOPS_PROGRESS": "1" if progress else "0", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([str(BIN / "llmops"), *args], cwd=project, env=env, capture_output=True, text=True, **popen)
    if check and out.returncode != 0:
        raise AssertionError(f"llmops {' '.join(args)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def kill_after_checkpoint(project: Path, stage: str, step: int, timeout_s: float = 600) -> int:
    """Run `llmops stage <stage> --no-track` in `project` and SIGKILL it once a complete checkpoint of at least `step`
    is on disk; returns the newest complete checkpoint's step at the kill."""
    env = os.environ | {"LLMOPS_PROGRESS": "0"}
    proc = subprocess.Popen([str(BIN / "llmops"), "stage", stage, "--no-track"], cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    done: list[int] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = [int(c.name.split("-")[1]) for c in (project / "checkpoints" / stage).glob("*/checkpoint-*") if (c / COMPLETE_MARKER).exists()]
            if any(s >= step for s in done):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed; make it longer"
        assert any(s >= step for s in done), f"no complete checkpoint of step {step} or later within {timeout_s} s"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    return max(done)
