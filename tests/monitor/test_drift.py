"""The monitor on a micro project: same-distribution code passes, English prose and broken records are flagged, and
nothing outside the monitor's side area changes."""

import hashlib
import json
from pathlib import Path

import pytest

from llmops.monitoring import drift as monitor
from llmops.monitoring.ledger import BatchAlreadyChecked
from llmops.monitoring.traffic import TRAFFIC_CHECKS
from llmops.params.load import load_params

from ..conftest import write_jsonl
from ..helpers import BIN, subprocess_env
from .conftest import LOAD_TEST, captured, in_batch, pool_files

DATA_CHECKS = ("token_length_ks", "unigram_js", "oov_rate_increase", "validation_pass_rate", "near_duplicate_share", "perplexity_ratio")

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
    assert all(scores[name] == scores[name] for name in DATA_CHECKS), "every data check was computed"  # NaN != NaN
    for check in (c for c in result.checks if c.name in TRAFFIC_CHECKS):
        assert check.score != check.score and "no record carries the capture fields" in check.note, "not traffic: said, not scored"
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
    def scored(result):  # NaN (a check not computed) never equals itself: compare it as None
        return [(c.name, None if c.score != c.score else c.score, c.flagged, c.note) for c in result.checks]

    assert scored(afresh) == scored(second), "reusing the held-out side changes no score"

    model = AutoModelForCausalLM.from_pretrained(project / "models" / "pretrain")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.5)  # another model in the same place: new weights, new key
    model.save_pretrained(project / "models" / "pretrain")
    retrained = run_monitor(project, prose_batch)
    assert retrained.info["heldout_perplexity_reused"] is False
    assert retrained.info["heldout_perplexity"] != pytest.approx(first.info["heldout_perplexity"], rel=1e-6)


def test_each_check_is_logged_at_its_ledger_step_with_the_batch_time_in_a_run_that_spans_the_check(project, same_distribution_batch, prose_batch):
    import os

    stat = prose_batch.stat()
    os.utime(prose_batch, (stat.st_atime, stat.st_mtime - 3600))  # the batch arrived an hour ago
    first, second = run_monitor(project, same_distribution_batch, track=True), run_monitor(project, prose_batch, track=True)
    assert (first.step, second.step) == (0, 1)
    client, runs = monitor_runs(project)
    run = client.get_run(second.mlflow_run_id)
    for check in (c for c in second.checks if c.score == c.score):
        [point] = client.get_metric_history(run.info.run_id, check.name)
        assert point.step == 1 and point.timestamp == int(prose_batch.stat().st_mtime * 1000), check.name
    assert len(runs) == 2 and not any(name in run.data.metrics for name in TRAFFIC_CHECKS), "a check not computed is not a metric"
    assert (run.info.end_time - run.info.start_time) / 1000 >= second.info["seconds"], "the run lasts as long as the check"
    assert run.data.tags["llmops.monitor.step"] == "1" and run.data.tags["llmops.batch_glob"].endswith("(one file)")
    assert {"drift_history.png", "report.html"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    ledger = json.loads((project / "data" / "monitor" / "ledger.json").read_text())
    assert [b["mlflow_run_id"] for b in ledger["batches"]] == [first.mlflow_run_id, second.mlflow_run_id]
    assert ledger["batches"][1]["drift"] is True and "unigram_js" in ledger["batches"][1]["flagged"]
    report = second.report.read_text()
    assert "Scores over time" in report and "Tokens whose share moved most" in report
    assert "<td><code>&#x27;" in report and "id 1" not in report, "unigrams are shown as the tokens they are"


def test_a_seen_batch_is_skipped_new_files_of_its_glob_are_checked_alone_and_a_forced_check_reads_all(project, same_distribution_batch, prose_batch, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    old = incoming / "capture-1.jsonl"
    old.write_bytes(same_distribution_batch.read_bytes())
    params = load_params(project / "params.yaml")
    checked = monitor.run(params, f"{incoming}/*.jsonl", skip_seen=True)
    assert checked.skipped_files == [] and not checked.drift
    with pytest.raises(BatchAlreadyChecked, match=r"all 1 file\(s\) of .*/\*\.jsonl \(a glob\) were already checked \(ledger .*ledger\.json\).*--force"):
        monitor.run(params, f"{incoming}/*.jsonl", skip_seen=True)
    (incoming / "capture-2.jsonl").write_bytes(prose_batch.read_bytes())
    new = monitor.run(params, f"{incoming}/*.jsonl", skip_seen=True)
    assert new.skipped_files == [str(old)] and new.files == [str(incoming / "capture-2.jsonl")]
    assert new.info["docs"] == len(prose_batch.read_text().splitlines()) and new.drift
    assert "1 already-checked file(s) skipped" in new.summary
    forced = monitor.run(params, f"{incoming}/*.jsonl")
    assert forced.skipped_files == [] and len(forced.files) == 2 and forced.step == 2


def test_the_monitor_flow_skips_a_batch_it_has_seen_and_force_checks_it_again(project, same_distribution_batch, tmp_path):
    """The scheduled deployment's code path, run as Prefect runs it (own PREFECT_HOME, ephemeral API)."""
    import subprocess

    (project / "data" / "incoming").mkdir(parents=True)
    (project / "data" / "incoming" / "capture-1.jsonl").write_bytes(same_distribution_batch.read_bytes())
    script = (
        "import json, sys\n"
        "from flows.monitor import monitor\n"
        "for force in (False, False, True):\n"
        "    out = monitor(batch='data/incoming/*.jsonl', retrain=False, repo_dir=sys.argv[1], force=force)\n"
        "    print(json.dumps({k: out[k] for k in ('skipped', 'batch_id', 'mlflow_run_id', 'summary')}))\n"
    )
    env = subprocess_env(tmp_path) | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([str(BIN / "python"), "-c", script, str(project)], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    first, seen, forced = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert not first["skipped"] and first["mlflow_run_id"]
    assert seen["skipped"] and not seen["mlflow_run_id"] and "already checked" in seen["summary"] and "--force" in seen["summary"]
    assert "already checked" in out.stderr, "the flow run's log says it skipped"
    assert not forced["skipped"] and forced["batch_id"] == first["batch_id"] and forced["mlflow_run_id"] != first["mlflow_run_id"]
    _, runs = monitor_runs(project)
    assert len(runs) == 2


def write_training_prompts(project: Path) -> int:
    """data/instructions/train.jsonl as finetune writes it, from the training files' docstring pairs."""
    from llmops.training.instructions import docstring_pairs

    pairs = [p for f in pool_files() if not in_batch(f) for p in docstring_pairs(f"stdlib/{f.parent.name}/{f.name}", f.read_text())]
    write_jsonl(project / "data" / "instructions" / "train.jsonl", [p.to_json() for p in pairs])
    return len(pairs)


def log_deploy_run(project: Path) -> str:
    """A deploy run with a passing load test in the project's tracking store, as the deploy flow leaves it."""
    import mlflow

    params = load_params(project / "params.yaml")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(params.tracking.experiment)
    run = client.create_run(experiment_id, tags={"llmops.deploy": "true", "llmops.deploy.status": "passed"})
    for key, value in LOAD_TEST.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_captured_traffic_like_training_passes_the_traffic_checks_and_off_traffic_fails_each(project, tmp_path):
    from llmops.training.instructions import docstring_pairs

    assert write_training_prompts(project) > 50
    deploy_run = log_deploy_run(project)
    prompts = [p.messages[0]["content"] for f in pool_files() if in_batch(f) for p in docstring_pairs(f.name, f.read_text())]
    good = write_jsonl(tmp_path / "good" / "capture-1.jsonl", [captured(i, text=t, latency_s=0.7 + 0.002 * (i % 50)) for i, t in enumerate(prompts)])
    result = run_monitor(project, good, track=True)
    by_name = {c.name: c for c in result.checks}
    assert not any(by_name[name].flagged for name in TRAFFIC_CHECKS), {name: by_name[name].score for name in TRAFFIC_CHECKS}
    assert by_name["refused_share"].score == 0.0 and by_name["latency_p95_ratio"].score == pytest.approx(0.795, abs=0.01)
    assert by_name["tokens_per_s_ratio"].score == pytest.approx(32 / 0.749 / 40, rel=0.02)
    assert by_name["prompt_length_ks"].score < by_name["prompt_length_ks"].threshold and deploy_run in by_name["latency_p95_ratio"].note
    bad_rows = [captured(i, text="fix it", refused=i % 4 == 0, latency_s=5.0, tokens_out=8) for i in range(len(prompts))]
    bad = run_monitor(project, write_jsonl(tmp_path / "bad" / "capture-1.jsonl", bad_rows), track=True)
    flagged = {c.name for c in bad.checks if c.flagged}
    assert set(TRAFFIC_CHECKS) <= flagged, {c.name: c.score for c in bad.checks}
    saved = json.loads((project / "metrics" / "monitor.json").read_text())
    refused = len(range(0, len(prompts), 4))
    assert saved["checks"]["refused_share"]["score"] == pytest.approx(refused / len(prompts)) and saved["traffic_refused"] == refused
    assert "refused_share" in bad.report.read_text()
    client, _ = monitor_runs(project)
    assert client.get_run(bad.mlflow_run_id).data.metrics["tokens_per_s_ratio"] == pytest.approx((8 / 5.0) / 40)
