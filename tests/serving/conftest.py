"""A servable micro model (random 2-layer Llama + a 300-token BPE with the code chat template) and a project directory around it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmops.data.sources import stdlib_root

from ..helpers import MICRO, ROOT

API_KEY = "test-key-" + "3f9a1c7e5b2d4a6f"
# Small enough for 2 loaded cores: one server start is ~15 s, a load test a few seconds.
SERVE_OVERRIDES = {
    "port": 0,
    "health_timeout_s": 180,
    "smoke_max_tokens": 4,
    "load_clients": 8,
    "load_requests": 16,
    "load_max_tokens": 8,
    "request_timeout_s": 120,
    "cb_num_blocks": 32,
    "supervise_interval_s": 1,
    "unhealthy_checks": 2,
}


def build_micro_model(out: Path) -> Path:
    """save_pretrained of a random micro Llama and its tokenizer: config.json, model.safetensors, tokenizer files."""
    import torch

    from llmops.params.pretrain import PretrainConfig
    from llmops.params.tokenize import TokenizeConfig
    from llmops.data.tokenizer import train_bpe
    from llmops.training.instructions import TEMPLATES
    from llmops.training.model import build_config, build_model

    texts = [p.read_text() for p in sorted((stdlib_root() / "json").glob("*.py"))]
    tokenizer = train_bpe(texts, TokenizeConfig(vocab_size=300))
    tokenizer.chat_template = TEMPLATES["code"]
    config = build_config(PretrainConfig(preset="micro", presets={"micro": MICRO}, seq_len=256), len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    build_model(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    return build_micro_model(tmp_path_factory.mktemp("served") / "micro")


def write_project(root: Path, **serve: object) -> Path:
    """A project directory with params.yaml (the repo's, tracking on a local sqlite store, small serve settings)."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["serve"].update(SERVE_OVERRIDES, **serve)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root
