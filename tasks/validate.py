"""validate: the Great Expectations data contract on data/raw; writes data/validated/, data/quarantine/ (each
rejected record with the expectations it failed) and Data Docs. Fails under `validate.min_pass_rate`.

Both GX suites run per shard in parallel and their counts merge into whole-corpus results and Data Docs (see
expectations.validate_shards): memory holds a few shards and the failing rows' rule names, not a per-record profile."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from llmops.common.errors import DataError
from llmops.common.io import atomic_dir, check_replaceable, record_shards, replace_dir
from llmops.common.results import StageResult
from llmops.data.expectations import validate_shards
from llmops.params.paths import PathsConfig
from llmops.params.validate import ValidateConfig


def run(cfg: ValidateConfig, paths: PathsConfig) -> StageResult:
    docs_dir = paths.reports / "validate" / "data_docs"
    shards = record_shards(paths.raw)
    check_replaceable(paths.validated)  # a foreign folder is refused before the work, not after
    paths.validated.parent.mkdir(parents=True, exist_ok=True)
    # Both outputs are written in one pass; the quarantine is kept even when the pass rate fails the stage.
    valid_tmp = Path(tempfile.mkdtemp(prefix=f".{paths.validated.name}.tmp-", dir=paths.validated.parent))
    try:
        with atomic_dir(paths.quarantine) as quarantine_tmp:
            docs_in, quarantined, per_expectation = validate_shards(shards, cfg, docs_dir, valid_tmp, quarantine_tmp)
        docs_out = docs_in - quarantined
        pass_rate = docs_out / docs_in if docs_in else 0.0
        if pass_rate >= cfg.min_pass_rate:
            replace_dir(valid_tmp, paths.validated)
    finally:
        shutil.rmtree(valid_tmp, ignore_errors=True)
    metrics = {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "quarantined": quarantined,
        "pass_rate": pass_rate,
        # MLflow keys rule.<rule>.failed / rule.<rule>.pass_rate; the rule names are build_suite's meta["rule"]
        "rule": {e["rule"]: {"failed": e["failed_rows"], "pass_rate": e["pass_rate"]} for e in per_expectation},
    }
    if pass_rate < cfg.min_pass_rate:
        worst = sorted(per_expectation, key=lambda e: e["pass_rate"])[:3]
        detail = "; ".join(f"{e['expectation']}: {e['failed_rows']} row(s) failed" for e in worst if e["failed_rows"])
        raise DataError(
            f"validate: pass rate {pass_rate:.2%} is under validate.min_pass_rate {cfg.min_pass_rate:.2%} "
            f"({quarantined} of {docs_in} records failed). Worst: {detail}. "
            f"Rejected rows with reasons: {paths.quarantine}; Data Docs: {docs_dir}/index.html"
        )
    summary = (
        f"validate: passed, {docs_in} records -> {docs_out} valid ({pass_rate:.2%}, at least {cfg.min_pass_rate:.2%} required) "
        f"at {paths.validated}, {quarantined} quarantined at {paths.quarantine}; Data Docs at {docs_dir}/index.html"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=[docs_dir])
