"""The monitor on a micro project: same-distribution code passes, English prose and broken records are flagged, and
nothing outside the monitor's side area changes."""

import hashlib
import json
from pathlib import Path

import pytest

from llmops.monitoring import drift as monitor
from llmops.params.load import load_params

from ..conftest import write_jsonl

pytestmark = pytest.mark.training  # the fixture trains a micro model for the perplexity check


def run_monitor(project: Path, batch: Path, track: bool = False) -> monitor.MonitorResult:
    return monitor.run(load_params(project / "params.yaml"), str(batch), track=track)


def tree_digest(root: Path, skip: tuple[str, ...]) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(str(p.relative_to(root)).startswith(s) for s in skip)
    }


def monitor_runs(project: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmops-monitor")
    return client, client.search_runs([experiment.experiment_id])


def test_a_batch_from_the_training_distribution_is_not_flagged(project, same_distribution_batch):
    result = run_monitor(project, same_distribution_batch, track=True)
    scores = {c.name: c.score for c in result.checks}
    assert not result.drift, scores
    assert all(v == v for v in scores.values()), "every check was computed"  # NaN != NaN
    saved = json.loads((project / "metrics" / "monitor.json").read_text())
    assert saved["drift"] is False and set(saved["checks"]) == set(scores)
    assert saved["model"] == "models/pretrain" and saved["heldout_perplexity"] > 1
    _, [run] = monitor_runs(project)
    assert run.info.run_id == result.mlflow_run_id and run.data.metrics["drift"] == 0.0
    assert run.data.metrics["unigram_js"] == pytest.approx(scores["unigram_js"])


def test_english_prose_is_flagged_on_token_lengths_and_unigrams_and_only_the_side_area_is_written(project, prose_batch):
    skip = ("data/monitor", "metrics/monitor.json", "mlflow.db", "mlartifacts")
    before = tree_digest(project, skip)
    result = run_monitor(project, prose_batch, track=True)
    flagged = {c.name for c in result.checks if c.flagged}
    assert result.drift and {"token_length_ks", "unigram_js"} <= flagged
    assert json.loads((project / "metrics" / "monitor.json").read_text())["drift"] is True
    assert "Drift report: DRIFT" in result.report.read_text()
    assert tree_digest(project, skip) == before, "the monitor wrote outside its side area"
    assert result.batch_dir.parent == project / "data" / "monitor"
    assert {"raw", "validated", "quarantine", "data_docs", "report.html", "monitor.json"} <= {p.name for p in result.batch_dir.iterdir()}
    client, [run] = monitor_runs(project)
    assert run.data.metrics["drift"] == 1.0 and run.data.tags["llmops.drift"] == "true"
    assert "unigram_js" in run.data.tags["llmops.flagged"]
    assert {"report.html", "monitor.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_records_that_break_the_data_contract_lower_the_pass_rate_check(project, same_distribution_batch, tmp_path):
    rows = [json.loads(line) for line in same_distribution_batch.read_text().splitlines()]
    broken = rows[:6] + [{"id": f"bin/{i}", "text": "\x00\x01\x02" * 50} for i in range(4)]
    result = run_monitor(project, write_jsonl(tmp_path / "broken.jsonl", broken))
    check = next(c for c in result.checks if c.name == "validation_pass_rate")
    assert check.score == pytest.approx(0.6) and check.flagged
    assert len(list((result.batch_dir / "quarantine").glob("*.parquet"))) == 1


def test_the_held_out_split_exported_as_a_batch_is_not_flagged(project):
    params = load_params(project / "params.yaml")
    batch = monitor.export_heldout(params)
    assert batch == project / params.monitor.heldout_batch
    rows = [json.loads(line) for line in batch.read_text().splitlines()]
    assert rows and all(r["id"].startswith("stdlib/") for r in rows)
    result = run_monitor(project, batch)
    assert not result.drift, {c.name: c.score for c in result.checks}
    assert result.info["docs"] == len(rows)


def test_the_held_out_perplexity_is_computed_once_per_model_and_reused_for_later_batches(project, same_distribution_batch, prose_batch):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    first, second = run_monitor(project, same_distribution_batch), run_monitor(project, prose_batch)
    assert first.info["heldout_perplexity_reused"] is False and second.info["heldout_perplexity_reused"] is True
    assert second.info["heldout_perplexity"] == first.info["heldout_perplexity"]
    shutil.rmtree(project / "data" / "monitor" / "heldout_perplexity")
    afresh = run_monitor(project, prose_batch)
    assert afresh.info["heldout_perplexity_reused"] is False
    assert afresh.info["heldout_perplexity"] == pytest.approx(first.info["heldout_perplexity"], rel=1e-9)
    assert afresh.checks == second.checks, "reusing the held-out side changes no score"

    model = AutoModelForCausalLM.from_pretrained(project / "models" / "pretrain")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)  # another model in the same place: new weights, new key
    model.save_pretrained(project / "models" / "pretrain")
    retrained = run_monitor(project, prose_batch)
    assert retrained.info["heldout_perplexity_reused"] is False
    assert retrained.info["heldout_perplexity"] != pytest.approx(first.info["heldout_perplexity"], rel=1e-6)
