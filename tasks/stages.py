"""The stage registry: how `llmops stage NAME` (what dvc.yaml calls) runs one stage in-process with tracking."""

from __future__ import annotations

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


STAGES: dict[str, Stage] = {
    "ingest": Stage(_ingest, ("ingest",), lambda p: []),
    "validate": Stage(_validate, ("validate",), lambda p: [p.paths.raw]),
    "dedup": Stage(_dedup, ("dedup",), lambda p: [p.paths.validated]),
    "tokenize": Stage(_tokenize, ("tokenize", "model"), lambda p: [p.paths.dedup]),
}


def run_stage(name: str, params: Params, *, track: bool = True) -> StageResult:
    """Run one stage, write metrics/<name>.json atomically, and log the run to MLflow."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    stage = STAGES[name]
    metrics_file = Path(params.paths.metrics) / f"{name}.json"
    section_params = {s: params.model_dump(by_alias=True)[s] for s in stage.sections}
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
