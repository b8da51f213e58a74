"""The stage table: every DVC stage's params keys, data inputs, outputs and metrics file, declared once in code.

`llmops stage NAME` (the runner), the pipeline flow, record accounting, reproduce and the monitor read it; dvc.yaml
declares the same DAG for DVC, and tests/unit/test_layout.py fails when the two disagree (names, params, data deps,
outs, metrics) or when a stage's code deps miss a module it imports. Paths are dvc.yaml's `${paths.KEY}` templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from llmops.common.errors import ConfigError

if TYPE_CHECKING:
    from llmops.params.paths import PathsConfig

TEMPLATE = re.compile(r"\$\{paths\.(\w+)\}")
MONITOR_METRICS = "monitor.json"  # the drift monitor (a flow, not a DVC stage) writes paths.metrics/monitor.json

# The metrics files the headline reads (llmops/common/headline.py's HEADLINE stages, in DAG order).
HEADLINE_FILES = ("ingest.json", "validate.json", "dedup.json", "tokenize.json", "pretrain.json", "finetune.json", "eval.json")

# The evaluate keys quantize (its variants) and distill (student and teacher) score with: held-out perplexity and
# HumanEval; not compare_base, max_pairs.
_QUANTIZE_EVALUATE_KEYS = (
    "seq_len", "eval_tokens", "batch_size", "max_problems", "samples_per_problem", "pass_k", "temperature", "top_p",
    "max_new_tokens", "seed", "timeout_s", "memory_mb", "max_processes", "max_file_mb", "workers", "allow_unsandboxed",
)  # fmt: skip


@dataclass(frozen=True)
class Stage:
    name: str  # the dvc.yaml stage and tasks/<name>.py
    kind: Literal["data", "model", "variants", "registry", "report"]  # data stages add up in record accounting; `llmops reproduce` re-runs the model stages
    params: tuple[str, ...]  # params.yaml keys it reads, as dvc.yaml lists them: a section, or section.key
    inputs: tuple[str, ...]  # data it reads (dvc.yaml deps besides code)
    outputs: tuple[str, ...]  # what it writes (dvc.yaml outs)
    metrics: str  # its metrics file under paths.metrics
    distributed: bool = False  # may run as several processes (train.launcher)
    dvc_metric: bool = False  # dvc.yaml declares the metrics file under `metrics:` (else under `outs:`, cache: false)

    @property
    def sections(self) -> tuple[str, ...]:
        """The params sections handed to tasks/<name>.run, in order, before `paths`."""
        return tuple(dict.fromkeys(key.split(".")[0] for key in self.params))

    def path(self, template: str, paths: PathsConfig) -> Path:
        """A `${paths.KEY}/...` template as a path (absolute when `paths` is resolved against a root)."""
        match = TEMPLATE.match(template)
        if not match:
            raise ConfigError(f"stage {self.name}: {template!r} does not start with ${{paths.KEY}}")
        rest = template[match.end() :].lstrip("/")
        base = getattr(paths, match.group(1))
        return base / rest if rest else base

    def metrics_file(self, paths: PathsConfig) -> Path:
        return paths.metrics / self.metrics


def _evaluate_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"evaluate.{key}" for key in keys)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("ingest", "data", ("ingest",), (), ("${paths.raw}",), "ingest.json"),
        Stage(
            "validate", "data", ("validate",), ("${paths.raw}",),
            ("${paths.validated}", "${paths.quarantine}", "${paths.reports}/validate/data_docs"), "validate.json",
        ),
        Stage("dedup", "data", ("dedup",), ("${paths.validated}",), ("${paths.dedup}", "${paths.duplicates}"), "dedup.json"),
        Stage("tokenize", "data", ("tokenize", "model.base"), ("${paths.dedup}",), ("${paths.tokens}", "${paths.tokenizer}"), "tokenize.json"),
        Stage(
            "pretrain", "model", ("pretrain", "train", "model.base"), ("${paths.tokens}", "${paths.tokenizer}"),
            ("${paths.pretrain_model}", "${paths.reports}/pretrain"), "pretrain.json", distributed=True,
        ),
        Stage(
            "finetune", "model", ("finetune", "train", "model.base"), ("${paths.dedup}", "${paths.pretrain_model}"),
            ("${paths.instructions}", "${paths.finetune_model}", "${paths.adapter}", "${paths.reports}/finetune"), "finetune.json",
            distributed=True,
        ),
        Stage(
            "align", "model",
            ("align", "train", "finetune.eval_fraction", *_evaluate_keys((
                "seq_len", "eval_tokens", "batch_size", "timeout_s", "memory_mb", "max_processes", "max_file_mb", "workers", "allow_unsandboxed",
            ))),
            ("${paths.finetune_model}", "${paths.dedup}", "${paths.tokens}"),
            ("${paths.aligned_model}", "${paths.reports}/align"), "align.json",
        ),  # fmt: skip
        Stage(
            # "variants": a model derived from the candidate and registered on its own, like quantize's; `llmops
            # reproduce` rebuilds the candidate's chain (the "model" stages), not its variants
            "distill", "variants", ("distill", "train", "register.model_name", "register.log_transformers_flavor", *_evaluate_keys(_QUANTIZE_EVALUATE_KEYS)),
            ("${paths.finetune_model}", "${paths.instructions}", "${paths.tokens}"),
            ("${paths.student_model}", "${paths.reports}/distill"), "distill.json",
        ),
        Stage(
            "evaluate", "model", ("evaluate", "model.base", "finetune.eval_fraction", "train.seed"),
            ("${paths.finetune_model}", "${paths.aligned_model}", "${paths.metrics}/align.json", "${paths.pretrain_model}", "${paths.tokens}", "${paths.instructions}",
             "${paths.dedup}"),
            ("${paths.reports}/evaluate",), "eval.json",
        ),
        Stage(
            "quantize", "variants", ("quantize", *_evaluate_keys(_QUANTIZE_EVALUATE_KEYS)),
            ("${paths.finetune_model}", "${paths.aligned_model}", "${paths.metrics}/align.json", "${paths.tokens}"),
            ("${paths.quantized}", "${paths.reports}/quantize"), "quantize.json",
        ),
        Stage(
            "register", "registry", ("register", "evaluate", "tracking"),
            ("${paths.finetune_model}", "${paths.aligned_model}", "${paths.metrics}/align.json", "${paths.quantized}", "${paths.tokens}", "${paths.instructions}",
             "${paths.metrics}/eval.json", "${paths.metrics}/quantize.json"),
            (), "register.json",
        ),  # fmt: skip
        # The headline of the whole pipeline (llmops/common/headline.py): the one file dvc.yaml declares as metrics,
        # so `dvc metrics show/diff` and `dvc exp show` are a dozen columns; `dvc metrics show metrics/<stage>.json` has the rest.
        Stage("summary", "report", (), tuple(f"${{paths.metrics}}/{name}" for name in HEADLINE_FILES), (), "summary.json", dvc_metric=True),
    )
}
DATA_STAGES = tuple(name for name, stage in STAGES.items() if stage.kind == "data")
MODEL_STAGES = tuple(name for name, stage in STAGES.items() if stage.kind == "model")


def stage_named(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]


def metrics_file(name: str, paths: PathsConfig) -> Path:
    """paths.metrics/<the stage's metrics file> (dvc.yaml's `metrics`); `monitor` is the drift monitor's."""
    return paths.metrics / (MONITOR_METRICS if name == "monitor" else stage_named(name).metrics)


def check_outputs_replaceable(paths: PathsConfig) -> None:
    """`dvc repro` deletes a stage's outputs before it runs the stage, so a folder at an output path must be one DVC
    recorded (dvc.lock) or one a stage wrote (see llmops.common.io.check_replaceable); anything else is refused here,
    before DVC deletes it."""
    from llmops.common.errors import StageError
    from llmops.common.fingerprints import dvc_lock_outputs
    from llmops.common.io import check_replaceable

    recorded = dvc_lock_outputs(paths.root / "dvc.lock")
    for stage in STAGES.values():
        for template in stage.outputs:
            path = stage.path(template, paths)
            if paths.relative(path) in recorded:
                continue
            try:
                check_replaceable(path)
            except StageError as exc:
                raise StageError(f"output {template} of stage {stage.name} (`dvc repro` deletes it before the stage runs): {exc}") from None
