"""register against the production kind of stack: `mlflow server` on PostgreSQL (artifacts proxied by the server) and
`prefect server`, which receives the llmops.champion.changed event."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import yaml

from llmops.registry import store as registry
from llmops.params.load import load_params
from llmops.common.env import PARENT_RUN as PARENT_RUN_ENV
from llmops.common.runner import run_stage

from ..helpers import MICRO

from ..conftest import store_of

pytestmark = pytest.mark.integration

NAME = "server-code"


def save_micro_model(out: Path) -> None:
    """An untrained micro Llama and a byte-level BPE tokenizer trained on a few lines of code."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, set_seed

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, vocab_size=300, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    set_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**MICRO, vocab_size=len(tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)


def champion_events(api: str) -> list[dict]:
    body = {"filter": {"event": {"name": ["llmops.champion.changed"]}}, "limit": 10}
    return httpx.post(f"{api}/events/filter", json=body, timeout=10).raise_for_status().json()["events"]


def test_register_on_mlflow_server_resolves_through_the_server_and_sends_the_prefect_event(stack, tmp_path, monkeypatch):
    import mlflow

    project = tmp_path / "proj"
    save_micro_model(project / "models" / "finetune")
    (project / "metrics").mkdir()
    (project / "metrics" / "eval.json").write_text(json.dumps({"perplexity": {"perplexity": 300.0}, "humaneval": {"pass_at_1": 0.0}}))
    (project / "params.yaml").write_text(yaml.safe_dump({"register": {"model_name": NAME}, "tracking": {"experiment": "registry-it"}}))
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_uri)
    monkeypatch.setenv("PREFECT_API_URL", stack.prefect_api)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)

    run_stage("register", load_params(Path("params.yaml")), track=True)
    result = json.loads(Path("metrics/register.json").read_text())
    assert result["decision"] == "promoted" and result["event"].startswith("sent (")

    params = load_params(Path("params.yaml"))
    ref = registry.resolve(f"{NAME}@champion", store_of(params), dest=tmp_path / "download")
    assert ref.version == result["version"] and (ref.path / "model.safetensors").is_file()
    pipe = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    assert pipe("def add(", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("def add(")

    deadline = time.monotonic() + 60
    while not (events := champion_events(stack.prefect_api)) and time.monotonic() < deadline:
        time.sleep(1)  # the server persists received events in the background
    assert [e["payload"] for e in events] == [{"name": NAME, "version": result["version"]}]
    assert events[0]["resource"]["prefect.resource.id"] == f"mlflow.model.{NAME}"
