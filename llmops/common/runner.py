"""How `llmops stage NAME` (what dvc.yaml calls) runs one stage: tasks/<NAME>.run with the sections the stage table
names and the resolved paths, its metrics written atomically, the run tracked in MLflow.

A distributed stage with `train.launcher` set re-runs the command under torchrun or accelerate; in the launched
processes only rank 0 tracks and writes metrics.
"""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops.common import env
from llmops.common.errors import StageError
from llmops.common.io import atomic_write_json
from llmops.common.results import StageResult
from llmops.common.stages import Stage, stage_named
from llmops.common.tracking import flatten

if TYPE_CHECKING:
    from llmops.params.load import Params

# How a stage uses its inputs, as MLflow's dataset context shows it.
DATASET_CONTEXT = {"pretrain": "training", "finetune": "training", "align": "training", "distill": "training", "evaluate": "evaluation", "quantize": "evaluation"}


def logged_params(stage: Stage, params: Params) -> dict[str, Any]:
    """Exactly the params.yaml keys the stage reads (its dvc.yaml `params`), as MLflow params."""
    out: dict[str, Any] = {}
    for key in stage.params:
        section, _, field = key.partition(".")
        values = params.section(section).model_dump(mode="json")
        out.update(flatten(section, values) if not field else {key: values[field]})
    return out


def input_paths(stage: Stage, params: Params) -> dict[str, Path]:
    """The stage's data inputs that exist, as dvc.lock names them -> absolute paths."""
    paths = params.paths
    found = {}
    for template in stage.inputs:
        path = stage.path(template, paths)
        if path.exists():
            found[paths.relative(path)] = path
    return found


def call(stage: Stage, params: Params) -> StageResult:
    module = importlib.import_module(f"tasks.{stage.name}")
    return module.run(*(params.section(s) for s in stage.sections), params.paths)


def run_stage(name: str, params: Params, *, track: bool = True, params_file: Path | None = None) -> StageResult:
    """Run one stage, write its metrics file atomically, and log the run to MLflow (unless `track` is false)."""
    stage = stage_named(name)
    metrics_file = stage.metrics_file(params.paths)
    if stage.distributed and params.train.launcher != "none" and not env.in_launched_process():
        return _launch(stage, params, params_file or params.paths.root / "params.yaml", track, metrics_file)
    if env.rank() != 0:
        call(stage, params)  # a worker process: rank 0 tracks, writes the metrics and reports
        return StageResult(metrics={}, summary="")
    if not track:
        result = call(stage, params)
        atomic_write_json(metrics_file, result.metrics)
        return result
    from llmops.common import tracking

    context = DATASET_CONTEXT.get(name, "input")
    inputs = input_paths(stage, params)
    with tracking.stage_run(params.tracking, params.paths.root, name, logged_params(stage, params), inputs, context=context, system_metrics=stage.distributed):
        result = call(stage, params)
        atomic_write_json(metrics_file, result.metrics)
        tracking.log_result(result, metrics_file)
    return result


def _launch(stage: Stage, params: Params, params_file: Path, track: bool, metrics_file: Path) -> StageResult:
    from llmops.common import launch

    cmd = launch.launch_command(params.train, stage.name, params_file, params.paths.root)
    if not track:
        cmd.append("--no-track")
    metrics_file.unlink(missing_ok=True)
    code = subprocess.call(cmd, cwd=params.paths.root)
    if code != 0 or not metrics_file.exists():
        raise StageError(f"stage '{stage.name}' under {params.train.launcher} exited with code {code}: {' '.join(cmd)}")
    metrics = json.loads(metrics_file.read_text())
    processes = params.train.nproc_per_node * params.train.nnodes
    return StageResult(metrics=metrics, summary=f"{stage.name}: {processes} processes via {params.train.launcher}; metrics in {metrics_file}")
