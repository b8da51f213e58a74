"""Backend command lines, the model-directory checks, the API key source and the load-test gate, without starting servers."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from flows.deploy import gate_failures
from llmops.params.serve import ServeConfig
from llmops.common.errors import ConfigError, ServeError
from llmops.serving.backends import choose_backend, context_tokens, inspect_model, kv_cache_blocks, transformers_command, vllm_command, vllm_executable
from llmops.serving.server import api_key

from ..helpers import ROOT

pytestmark = pytest.mark.unit

SOCKET = Path("/run/llmops-serve-x/backend.sock")


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.fixture
def model_copy(micro_model, tmp_path) -> Path:
    return Path(shutil.copytree(micro_model, tmp_path / "model"))


def test_vllm_command_serves_the_name_with_params_and_no_quantization_flag(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "int-quantized"}
    (model_copy / "config.json").write_text(json.dumps(config))
    model = inspect_model(model_copy, "llmops-code-w8a8")
    cmd = vllm_command(model, ServeConfig(max_model_len=1024, tensor_parallel_size=2), uds=SOCKET)

    assert cmd[1:3] == ["serve", str(model_copy.resolve())]
    assert model.quantization == "compressed-tensors"
    assert "--quantization" not in cmd  # vLLM reads compressed-tensors from config.json
    assert flag(cmd, "--served-model-name") == "llmops-code-w8a8"
    assert (flag(cmd, "--max-model-len"), flag(cmd, "--tensor-parallel-size")) == ("1024", "2")
    assert flag(cmd, "--uds") == str(SOCKET)
    assert "--host" not in cmd and "--port" not in cmd  # the socket is the only way in, and only the proxy's user can open it
    assert flag(cmd, "--generation-config") == "vllm" and flag(cmd, "--load-format") == "safetensors"
    assert "--trust-remote-code" not in cmd and "--api-key" not in cmd  # the key travels in the environment, never argv


def test_vllm_serves_a_lora_adapter_with_enable_lora(model_copy, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model_copy), "r": 32, "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    model = inspect_model(adapter, "llmops-code")
    cmd = vllm_command(model, ServeConfig(max_lora_rank=16), uds=SOCKET)

    assert cmd[2] == str(model_copy) and "--enable-lora" in cmd
    assert flag(cmd, "--lora-modules") == f"llmops-code={adapter.resolve()}"
    assert flag(cmd, "--max-lora-rank") == "32"
    assert flag(cmd, "--served-model-name") == "llmops-code-base"
    with pytest.raises(ServeError, match="LoRA adapter"):
        transformers_command(model, ServeConfig(), uds=SOCKET)


def test_transformers_command_serves_transformers_app_on_the_socket_with_continuous_batching(model_copy):
    cmd = transformers_command(inspect_model(model_copy, "m"), ServeConfig(cb_num_blocks=64, cb_block_size=128, torch_threads=2), uds=SOCKET)

    assert cmd[1:4] == ["-m", "llmops.serving.cpu_backend", str(model_copy.resolve())]
    assert (flag(cmd, "--uds"), flag(cmd, "--device"), flag(cmd, "--cb-num-blocks"), flag(cmd, "--cb-block-size"), flag(cmd, "--torch-threads")) == (str(SOCKET), "cpu", "64", "128", "2")
    assert "--host" not in cmd and "--port" not in cmd


def test_the_cpu_backend_passes_only_options_transformers_serve_takes():
    """llmops.serving.cpu_backend calls transformers' Serve with these keyword arguments: a release that renames one fails here first."""
    import inspect

    from transformers.cli.serve import Serve

    taken = set(inspect.signature(Serve).parameters)
    assert {"force_model", "continuous_batching", "device", "trust_remote_code", "cb_num_blocks", "cb_block_size", "cb_max_batch_tokens", "host", "port", "log_level"} <= taken


def test_a_request_may_hold_the_context_and_the_proxy_shares_out_the_kv_cache(model_copy):
    model = inspect_model(model_copy, "m")
    positions = json.loads((model_copy / "config.json").read_text())["max_position_embeddings"]

    assert context_tokens("transformers", model, ServeConfig()) == positions
    assert context_tokens("vllm", model, ServeConfig(max_model_len=positions // 2)) == positions // 2
    assert context_tokens("vllm", model, ServeConfig(max_model_len=positions * 4)) == positions
    assert kv_cache_blocks("transformers", ServeConfig(cb_num_blocks=32)) == 32
    assert kv_cache_blocks("vllm", ServeConfig(cb_num_blocks=32)) == 0  # vLLM schedules its own cache


def test_pickle_only_weights_are_refused(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(ServeError, match=r"no safetensors weights \(found pickle weights: pytorch_model.bin\)"):
        inspect_model(model_copy, "m")


def test_remote_code_is_refused(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServeError, match="remote code is never trusted"):
        inspect_model(model_copy, "m")


def test_a_directory_without_tokenizer_or_config_is_refused(model_copy, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    with pytest.raises(ServeError, match="no tokenizer files"):
        inspect_model(model_copy, "m")
    with pytest.raises(ServeError, match="no config.json"):
        inspect_model(tmp_path, "m")


def test_api_key_file_is_created_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOPS_API_KEY", raising=False)
    cfg = ServeConfig(api_key_file="secrets/key")
    first = api_key(cfg, tmp_path)
    assert len(first) >= 32
    assert stat.S_IMODE((tmp_path / "secrets" / "key").stat().st_mode) == 0o600
    assert api_key(cfg, tmp_path) == first
    monkeypatch.setenv("LLMOPS_API_KEY", "from-env")
    assert api_key(cfg, tmp_path) == "from-env"


def test_a_key_file_others_can_read_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOPS_API_KEY", raising=False)
    path = tmp_path / "key"
    path.write_text("k")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        api_key(ServeConfig(api_key_file="key"), tmp_path)


def test_gate_fails_on_errors_or_slow_p95():
    load = {"error_rate": 0.0, "errors": 0, "requests": 10, "latency_p95_s": 2.0, "first_errors": []}
    assert gate_failures(load, ServeConfig(max_p95_latency_s=5)) == []
    assert "p95 latency" in gate_failures(load, ServeConfig(max_p95_latency_s=1))[0]
    failing = {**load, "error_rate": 0.2, "errors": 2, "first_errors": ["APITimeoutError"]}
    assert "error rate 0.200 (2/10)" in gate_failures(failing, ServeConfig(max_p95_latency_s=0))[0]


def test_vllm_is_found_in_its_own_venv_and_its_absence_is_explained(tmp_path, monkeypatch):
    from llmops.serving import backends

    assert backends.VLLM_VENV == ROOT / ".venv-vllm"  # where `make vllm` puts it: beside .venv, whatever the working directory
    monkeypatch.setattr(backends, "VLLM_VENV", tmp_path / ".venv-vllm")
    monkeypatch.delenv("LLMOPS_VLLM_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert vllm_executable() is None and choose_backend("auto") == "transformers"
    with pytest.raises(ConfigError, match="make vllm"):
        choose_backend("vllm")
    script = tmp_path / ".venv-vllm" / "bin" / "vllm"  # what `make vllm` leaves
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert vllm_executable() == str(script)
    assert choose_backend("vllm") == "vllm"
