"""The parent run's headline: read from the stages' metrics files, one name per quantity, missing stages left out."""

import json

import pytest

from llmops.common import headline
from llmops.common.stages import metrics_file

from ..conftest import project_paths

pytestmark = pytest.mark.unit


def write(paths, stage, payload):
    path = metrics_file(stage, paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_headline_reads_each_stage_and_derives_duplicates(tmp_path):
    paths = project_paths(tmp_path)
    write(paths, "ingest", {"docs": 100})
    write(paths, "validate", {"quarantined": 7})
    write(paths, "dedup", {"docs_out": 80})
    write(paths, "evaluate", {"humaneval": {"pass_at_1": 0.25, "sandboxed": True}, "perplexity": {"perplexity": 12.5}})
    write(paths, "finetune", {"eval_loss": 2.5, "tokens": 1000, "train_seconds": 3.0})
    out = headline.headline_metrics(paths)
    assert out["quality.pass_at_1"] == 0.25 and out["quality.perplexity"] == 12.5
    assert out["quality.finetune_eval_loss"] == 2.5 and out["cost.finetune_tokens"] == 1000
    assert (out["data.records_in"], out["data.kept"], out["data.quarantined"], out["data.duplicates"]) == (100, 80, 7, 13)
    assert "quality.pretrain_eval_loss" not in out and "cost.pretrain_tokens" not in out  # pretrain wrote nothing


def test_a_slice_of_the_dag_gives_only_its_keys_and_booleans_are_not_numbers(tmp_path):
    paths = project_paths(tmp_path)
    write(paths, "evaluate", {"humaneval": {"pass_at_1": True}})
    assert headline.headline_metrics(paths) == {}


def test_run_name_tells_runs_apart_and_stays_short():
    assert headline.run_name("amber-fox", []) == "pipeline amber-fox"
    assert headline.run_name("amber-fox", ["dedup.threshold=0.8"]) == "pipeline amber-fox dedup.threshold=0.8"
    long = headline.run_name("x", ["k=" + "v" * 300])
    assert len(long) == 120 and long.endswith("…")


def test_description_lists_stages_overrides_and_the_headline_table():
    text = headline.description({"ingest": {"cached": False}, "dedup": {"cached": True}}, {"quality.pass_at_1": 0.5}, ["a.b=1"])
    assert text.splitlines()[0] == "**Stages run:** ingest; **up to date:** dedup."
    assert "`a.b=1`" in text and "| quality.pass_at_1 | 0.5 |" in text


def test_the_summary_stage_reads_every_headline_file_and_writes_it_nested(tmp_path):
    from llmops.common.stages import HEADLINE_FILES, STAGES
    from tasks import summary

    assert {metrics_file(stage, project_paths(tmp_path)).name for stage, _ in headline.HEADLINE.values()} == set(HEADLINE_FILES)
    assert STAGES["summary"].inputs == tuple(f"${{paths.metrics}}/{name}" for name in HEADLINE_FILES)
    paths = project_paths(tmp_path)
    write(paths, "ingest", {"docs": 100})
    write(paths, "evaluate", {"humaneval": {"pass_at_1": 0.25}, "perplexity": {"perplexity": 12.5}})
    result = summary.run(paths)
    assert result.metrics == {"data": {"records_in": 100}, "quality": {"pass_at_1": 0.25, "perplexity": 12.5}}
    assert "quality.pass_at_1 0.25" in result.summary


def test_facts_go_to_params_and_measurements_to_metrics():
    from llmops.common.results import StageResult

    result = StageResult(
        metrics={"parameters": 10, "tokens": 5, "humaneval": {"problems": 2, "pass_at_1": 0.5}, "calibration": {"samples": 4, "seq_len": 8}},
        summary="", facts=("parameters", "humaneval.problems", "calibration"),
    )
    assert result.numeric_metrics() == {"tokens": 5.0, "humaneval.pass_at_1": 0.5}
    assert result.fact_params() == {"parameters": 10, "humaneval.problems": 2, "calibration.samples": 4, "calibration.seq_len": 8}
