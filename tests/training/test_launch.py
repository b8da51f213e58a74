"""Launch configs for scaling out: every accelerate config in infra/ loads, and the stage builds the right launcher command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from llmops.params.train import TrainConfig
from llmops.common.errors import ConfigError
from llmops.common.launch import launch_command

from ..conftest import ROOT

pytestmark = pytest.mark.training

CONFIGS = {
    "ddp.yaml": ("MULTI_GPU", None),
    "multinode_ddp.yaml": ("MULTI_GPU", None),
    "fsdp.yaml": ("FSDP", None),
    "zero2.yaml": ("DEEPSPEED", 2),
    "zero3_offload.yaml": ("DEEPSPEED", 3),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_configs_load_with_accelerates_own_parser(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "infra/accelerate" / name))
    distributed, zero_stage = CONFIGS[name]
    assert config.distributed_type.value == distributed
    if zero_stage is not None:
        assert config.deepspeed_config["zero_stage"] == zero_stage
    if name == "zero3_offload.yaml":
        assert config.deepspeed_config["offload_optimizer_device"] == "cpu" and config.deepspeed_config["offload_param_device"] == "cpu"
    if name == "fsdp.yaml":
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_every_config_in_infra_is_covered():
    assert {p.name for p in (ROOT / "infra/accelerate").glob("*.yaml")} == set(CONFIGS)


def test_launch_commands(monkeypatch):
    torchrun = launch_command(TrainConfig(launcher="torchrun", nproc_per_node=4), "pretrain", Path("params.yaml"), ROOT)
    assert torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in torchrun and "--standalone" in torchrun
    assert torchrun[-6:] == ["-m", "flows.cli", "stage", "pretrain", "--params", "params.yaml"]

    with pytest.raises(ConfigError, match="LLMOPS_RDZV_ENDPOINT"):
        launch_command(TrainConfig(launcher="torchrun", nnodes=2), "pretrain", Path("params.yaml"), ROOT)
    monkeypatch.setenv("LLMOPS_RDZV_ENDPOINT", "10.0.0.1:29400")
    multi = launch_command(TrainConfig(launcher="torchrun", nnodes=2, nproc_per_node=8), "finetune", Path("p.yaml"), ROOT)
    assert "--rdzv-endpoint=10.0.0.1:29400" in multi and "--nnodes=2" in multi and "--standalone" not in multi

    acc = launch_command(TrainConfig(launcher="accelerate", nproc_per_node=8, nnodes=2, accelerate_config="infra/accelerate/fsdp.yaml"), "pretrain", Path("params.yaml"), ROOT)
    assert acc[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--num_processes=16" in acc and "--num_machines=2" in acc
    assert acc[acc.index("--config_file") + 1] == str(ROOT / "infra/accelerate/fsdp.yaml")  # relative to the repository root
    with pytest.raises(ConfigError, match="not found"):
        launch_command(TrainConfig(launcher="accelerate", accelerate_config="nope.yaml"), "pretrain", Path("params.yaml"), ROOT)
