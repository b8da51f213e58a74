"""The stage registry: how `llmops stage NAME` (what dvc.yaml calls) runs one stage in-process with tracking."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.common.config import Params
from tasks.common.errors import ConfigError
from tasks.common.io import atomic_write_json
from tasks.common.result import StageResult


@dataclass(frozen=True)
class Stage:
    run: Callable[[Params], StageResult]
    sections: tuple[str, ...]  # params sections the stage reads (logged as MLflow params)
    inputs: Callable[[Params], list[str]]  # data directories it reads (logged as MLflow datasets)
    distributed: bool = False  # may run as several processes (train.launcher)
    metrics_name: str = ""  # metrics/<metrics_name>.json; "" = the stage name


def metrics_filename(name: str) -> str:
    """A stage's metrics file name, as dvc.yaml declares it under `metrics` (evaluate writes eval.json)."""
    stage = STAGES.get(name)
    return f"{(stage.metrics_name if stage else '') or name}.json"


def metrics_path(name: str, params: Params) -> Path:
    return Path(params.paths.metrics) / metrics_filename(name)


def _ingest(p: Params) -> StageResult:
    from tasks import ingest

    return ingest.run(p.ingest, Path(p.paths.raw))


def _validate(p: Params) -> StageResult:
    from tasks import validate

    docs = Path(p.paths.reports) / "validate" / "data_docs"
    return validate.run(p.validate_, Path(p.paths.raw), Path(p.paths.validated), Path(p.paths.quarantine), docs)


def _dedup(p: Params) -> StageResult:
    from tasks import dedup

    return dedup.run(p.dedup, Path(p.paths.validated), Path(p.paths.dedup), Path(p.paths.duplicates))


def _tokenize(p: Params) -> StageResult:
    from tasks import tokenization

    return tokenization.run(p.tokenize, p.model, Path(p.paths.dedup), Path(p.paths.tokens), Path(p.paths.tokenizer))


def _pretrain(p: Params) -> StageResult:
    from tasks import pretrain

    return pretrain.run(p)


def _finetune(p: Params) -> StageResult:
    from tasks import finetune

    return finetune.run(p)


def _evaluate(p: Params) -> StageResult:
    from tasks import evaluate

    return evaluate.run(p)


def _register(p: Params) -> StageResult:
    from tasks import register

    return register.run(p)


def _evaluate_inputs(p: Params) -> list[str]:
    from tasks import evaluate

    base = evaluate.base_model_dir(p) if p.evaluate.compare_base else None
    return [p.paths.finetune_model, p.paths.tokens, p.paths.instructions] + ([str(base)] if base else [])


def _finetune_inputs(p: Params) -> list[str]:
    data = [p.finetune.data] if p.finetune.data else [p.paths.dedup]
    return data + ([] if p.model.base else [p.paths.pretrain_model])


STAGES: dict[str, Stage] = {
    "ingest": Stage(_ingest, ("ingest",), lambda p: []),
    "validate": Stage(_validate, ("validate",), lambda p: [p.paths.raw]),
    "dedup": Stage(_dedup, ("dedup",), lambda p: [p.paths.validated]),
    "tokenize": Stage(_tokenize, ("tokenize", "model"), lambda p: [p.paths.dedup]),
    "pretrain": Stage(_pretrain, ("pretrain", "train", "model"), lambda p: [p.paths.tokens], distributed=True),
    "finetune": Stage(_finetune, ("finetune", "train", "model"), _finetune_inputs, distributed=True),
    "evaluate": Stage(_evaluate, ("evaluate",), _evaluate_inputs, metrics_name="eval"),
    "register": Stage(_register, ("register",), lambda p: [p.paths.finetune_model], metrics_name="register"),
}


def run_stage(name: str, params: Params, *, track: bool = True, params_file: Path = Path("params.yaml")) -> StageResult:
    """Run one stage, write metrics/<name>.json atomically, and log the run to MLflow.

    A distributed stage with `train.launcher` set re-runs this command under the launcher; in the
    launched processes only rank 0 tracks and writes metrics.
    """
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    stage = STAGES[name]
    metrics_file = metrics_path(name, params)
    section_params = {s: params.model_dump(by_alias=True)[s] for s in stage.sections}
    from tasks.training import launch

    if stage.distributed and params.train.launcher != "none" and not launch.in_launched_process():
        return _launch(name, params, params_file, track, metrics_file)
    if int(os.environ.get("RANK", "0")) != 0:
        stage.run(params)  # a worker process: rank 0 tracks, writes the metrics and reports
        return StageResult(metrics={}, summary="")
    if not track:
        result = stage.run(params)
        atomic_write_json(metrics_file, result.metrics)
        return result
    from tasks.common import tracking

    with tracking.stage_run(params.tracking, name, section_params, stage.inputs(params)):
        result = stage.run(params)
        atomic_write_json(metrics_file, result.metrics)
        tracking.log_result(result, metrics_file)
    return result


def _launch(name: str, params: Params, params_file: Path, track: bool, metrics_file: Path) -> StageResult:
    import json

    from tasks.common.errors import StageError
    from tasks.training import launch

    cmd = launch.launch_command(params.train, name, params_file)
    if not track:
        cmd.append("--no-track")
    metrics_file.unlink(missing_ok=True)
    code = subprocess.call(cmd)
    if code != 0 or not metrics_file.exists():
        raise StageError(f"stage '{name}' under {params.train.launcher} exited with code {code}: {' '.join(cmd)}")
    metrics = json.loads(metrics_file.read_text())
    return StageResult(metrics=metrics, summary=f"{name}: {params.train.nproc_per_node * params.train.nnodes} processes via {params.train.launcher}; metrics in {metrics_file}")
