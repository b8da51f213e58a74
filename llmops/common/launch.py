"""The command line that runs a stage under torchrun or `accelerate launch` when `train.launcher` says so.

`llmops stage pretrain` (what dvc.yaml calls) re-executes itself under the launcher; every process
then runs the stage, and process 0 tracks it and writes the outputs. DVC and the Prefect flow see
one command either way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from typing import TYPE_CHECKING

from llmops.common import env
from llmops.common.errors import ConfigError

if TYPE_CHECKING:
    from llmops.params.train import TrainConfig


def launch_command(train: TrainConfig, stage: str, params_file: Path, root: Path) -> list[str]:
    """The launcher's command line; `train.accelerate_config` is relative to the repository `root`."""
    inner = ["-m", "flows.cli", "stage", stage, "--params", str(params_file)]
    if train.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={train.nproc_per_node}", f"--nnodes={train.nnodes}"]
        if train.nnodes == 1:
            cmd.append("--standalone")
        else:
            endpoint = env.get(env.RDZV_ENDPOINT)
            if not endpoint:
                raise ConfigError(f"train.nnodes > 1 needs {env.RDZV_ENDPOINT}=host:port (the rendezvous node), set on every node")
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={env.get(env.RDZV_ID, stage)}"]
        return cmd + inner
    if train.launcher == "accelerate":
        config = Path(root) / train.accelerate_config
        if not config.is_file():
            raise ConfigError(f"params.yaml: train.accelerate_config={train.accelerate_config!r} not found under {root} (see infra/accelerate/)")
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            f"--num_processes={train.nproc_per_node * train.nnodes}", f"--num_machines={train.nnodes}", *inner,
        ]
    raise ConfigError(f"train.launcher={train.launcher!r}: nothing to launch")
