"""summary: the pipeline's headline (quality, data, cost) from the stages' metrics files into metrics/summary.json.

dvc.yaml declares this one file as the pipeline's metrics, so `dvc metrics show`, `dvc metrics diff` and
`dvc exp show` compare runs on a dozen numbers; each stage's own file stays beside it
(`dvc metrics show metrics/eval.json`).
"""

from __future__ import annotations

from llmops.common import headline
from llmops.common.results import StageResult
from llmops.params.paths import PathsConfig


def run(paths: PathsConfig) -> StageResult:
    values = headline.headline_metrics(paths)
    summary = "summary: " + ", ".join(f"{key} {headline.fmt(value)}" for key, value in values.items())
    return StageResult(metrics=headline.nested(values), summary=summary)
