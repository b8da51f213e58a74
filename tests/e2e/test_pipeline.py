"""The whole DAG (data stages, then pretrain and finetune of a micro model) through the Prefect flow in a temporary
git+DVC repo; then `dvc repro` re-runs nothing."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ..helpers import BIN, CORPUS_FILES, make_repo, sh, subprocess_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    env = subprocess_env(root)
    repo = make_repo(root, env)
    run = sh(BIN / "llmops", "run", cwd=repo, env=env)
    return repo, root, env, run


def metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / "metrics" / f"{stage}.json").read_text())


def mlflow_runs(repo: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmops")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_flow_runs_every_stage_and_the_records_add_up(repo):
    repo, _, _, run = repo
    console = " ".join(run.stderr.split())  # rich wraps long lines at the terminal width
    assert "pipeline done: ran " in console, console[-3000:]
    ran = console.split("pipeline done: ran ", 1)[1].split(";", 1)[0].split(", ")
    assert ran[:6] == ["ingest", "validate", "dedup", "tokenize", "pretrain", "finetune"]
    # what only needs the fine-tuned model (and align's choice of candidate) comes after it in an order DVC picks
    assert sorted(ran[6:]) == ["align", "distill", "evaluate", "quantize", "register", "summary"]
    assert ran.index("align") < min(ran.index(s) for s in ("evaluate", "quantize", "register")) and ran.index("quantize") < ran.index("register")  # both only need finetune's model: DVC may order them either way
    ingest, validate, dedup = metrics(repo, "ingest"), metrics(repo, "validate"), metrics(repo, "dedup")
    assert ingest["docs"] == len(CORPUS_FILES) + 3
    assert validate["quarantined"] >= 1
    assert dedup["exact_duplicates"] >= 1 and dedup["near_duplicates"] >= 1
    assert ingest["docs"] == dedup["docs_out"] + validate["quarantined"] + dedup["exact_duplicates"] + dedup["near_duplicates"]
    tokenize = metrics(repo, "tokenize")
    assert tokenize["train_docs"] + tokenize["val_docs"] == dedup["docs_out"]


def test_mlflow_has_a_parent_run_with_a_nested_run_per_stage_and_dvc_md5_inputs(repo):
    repo, _, _, _ = repo
    client, runs = mlflow_runs(repo)
    parents = [r for r in runs if r.data.tags.get("llmops.pipeline") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    children = {r.data.tags["llmops.stage"]: r for r in nested if "llmops.stage" in r.data.tags}
    assert [r.info.run_name for r in nested if "llmops.stage" not in r.data.tags] == ["deploy"]  # the deploy it ended with
    assert set(children) == {"ingest", "validate", "dedup", "tokenize", "pretrain", "finetune", "align", "distill", "evaluate", "quantize", "register", "summary"}
    assert children["dedup"].data.metrics["docs_in"] == metrics(repo, "dedup")["docs_in"]
    assert children["validate"].data.params["validate.min_pass_rate"] == "0.5"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    raw_md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    inputs = children["validate"].inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("data/raw", raw_md5[:36])]
    artifacts = {a.path for a in client.list_artifacts(children["validate"].info.run_id)}
    assert {"data_docs", "metrics"} <= artifacts


def test_the_parent_run_carries_the_headline_a_name_a_description_and_the_commit(repo):
    repo, _, _, _ = repo
    client, runs = mlflow_runs(repo)
    parent = next(r for r in runs if r.data.tags.get("llmops.pipeline") == "true")
    evaluate, dedup = metrics(repo, "eval"), metrics(repo, "dedup")
    assert parent.data.metrics["quality.pass_at_1"] == evaluate["humaneval"]["pass_at_1"]
    assert parent.data.metrics["quality.perplexity"] == pytest.approx(evaluate["perplexity"]["perplexity"])
    assert parent.data.metrics["quality.finetune_eval_loss"] == pytest.approx(metrics(repo, "finetune")["eval_loss"])
    assert parent.data.metrics["data.kept"] == dedup["docs_out"]
    assert parent.data.metrics["data.duplicates"] == dedup["exact_duplicates"] + dedup["near_duplicates"]
    assert parent.info.run_name.startswith("pipeline ") and parent.info.run_name != "pipeline "
    assert parent.data.tags["mlflow.source.git.commit"] == sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    note = parent.data.tags["mlflow.note.content"]
    assert "**Stages run:** ingest, validate" in note and "| quality.pass_at_1 |" in note
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs, not GenAI traces


def test_training_stages_log_per_step_curves_and_the_model_to_mlflow(repo):
    repo, _, _, _ = repo
    client, runs = mlflow_runs(repo)
    pretrain = next(r for r in runs if r.data.tags.get("llmops.stage") == "pretrain")
    steps = metrics(repo, "pretrain")["steps"]
    assert steps == 12
    for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
        history = client.get_metric_history(pretrain.info.run_id, name)
        assert len(history) >= steps - 1, (name, len(history))
        assert sorted(m.step for m in history)[-1] == steps
    lrs = [m.value for m in sorted(client.get_metric_history(pretrain.info.run_id, "lr"), key=lambda m: m.step)]
    assert max(lrs) > lrs[-1], "cosine schedule decays after warmup"
    assert pretrain.data.params["pretrain.preset"] == "micro"
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"loss_curve.png", "pretrain", "metrics"} <= artifacts
    model_files = {a.path for a in client.list_artifacts(pretrain.info.run_id, "pretrain")}
    assert {"pretrain/config.json", "pretrain/model.safetensors", "pretrain/tokenizer.json"} <= model_files
    finetune = next(r for r in runs if r.data.tags.get("llmops.stage") == "finetune")
    assert len(client.get_metric_history(finetune.info.run_id, "loss")) >= 3
    assert finetune.data.metrics["pairs.train"] > 0
    inputs = {i.dataset.name for i in finetune.inputs.dataset_inputs}
    assert inputs == {"data/dedup", "models/pretrain"}
    assert {t.value for i in finetune.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"} == {"training"}
    for run in (pretrain, finetune):  # one name for the held-out loss in both stages, as a curve
        assert max(m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")) == metrics(repo, run.data.tags["llmops.stage"])["steps"]


def test_dvc_plots_draw_the_training_curves(repo):
    repo, _, env, _ = repo
    shown = json.loads(sh(BIN / "dvc", "plots", "show", "--json", cwd=repo, env=env).stdout)["data"]
    for plot in ("pretrain_loss", "pretrain_lr", "finetune_loss"):
        points = shown[plot][0]["content"]["data"]["values"]
        assert len(points) >= 3, plot
    fields = {p["filename::field"] for p in shown["finetune_loss"][0]["content"]["data"]["values"]}
    assert fields == {"train_curve.tsv::loss", "eval_curve.tsv::eval_loss"}
    variants = shown["quantize_perplexity"][0]["content"]["data"]["values"]
    assert {v["scheme"] for v in variants} == {"unquantized", "w8a8", "w4a16"} and all(float(v["perplexity"]) > 1 for v in variants)


def test_evaluate_logs_eval_metrics_and_the_samples_table_to_mlflow(repo, tmp_path):
    repo, _, env, _ = repo
    client, runs = mlflow_runs(repo)
    evaluate = next(r for r in runs if r.data.tags.get("llmops.stage") == "evaluate")
    eval_metrics = metrics(repo, "eval")
    assert eval_metrics["humaneval"]["problems"] == 2 and eval_metrics["humaneval"]["sandboxed"] is True
    for name in ("perplexity.perplexity", "base_perplexity.perplexity", "humaneval.pass_at_1", "instructions.syntax_valid_rate",
                 "instructions.exact_match", "instructions.fuzzy_match"):
        assert name in evaluate.data.metrics, name
    assert evaluate.data.metrics["humaneval.pass_at_1"] == eval_metrics["humaneval"]["pass_at_1"]
    # how much was scored is a param of the run, not a chart
    assert "humaneval.problems" not in evaluate.data.metrics and evaluate.data.params["humaneval.problems"] == "2"
    assert {"eval_samples.json", "samples.jsonl", "metrics"} <= {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    table = json.loads(Path(client.download_artifacts(evaluate.info.run_id, "eval_samples.json", str(tmp_path))).read_text())
    assert len(table["data"]) == 2 + 3 and set(table["columns"]) >= {"task", "prompt", "output", "passed"}
    shown = json.loads(sh(BIN / "dvc", "metrics", "show", "--json", "metrics/eval.json", cwd=repo, env=env).stdout)
    [(_, workspace)] = shown.items()
    assert workspace["data"]["metrics/eval.json"]["data"]["humaneval"]["pass_at_1"] == eval_metrics["humaneval"]["pass_at_1"]


def test_register_leaves_a_champion_version_with_lineage_tags(repo):
    repo, _, _, _ = repo
    client, runs = mlflow_runs(repo)
    result = metrics(repo, "register")
    assert result["decision"] == "promoted" and result["champion_after"] == result["version"] == "1"
    version = client.get_model_version_by_alias("llmops-code", "champion")
    tags = version.tags
    parent = next(r for r in runs if r.data.tags.get("llmops.pipeline") == "true")
    assert tags["llmops.pipeline_run_id"] == parent.info.run_id
    assert tags["llmops.prefect_flow_run_id"] == parent.data.tags["prefect.flow_run_id"] != ""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for stage in ("ingest", "tokenize", "finetune"):
        for out in lock["stages"][stage]["outs"]:
            assert tags[f"llmops.dvc.{out['path']}"] == out["md5"]
    stage_runs = {r.data.tags["llmops.stage"]: r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and "llmops.stage" in r.data.tags}
    assert all(tags[f"llmops.run.{stage}"] == stage_runs[stage] for stage in ("ingest", "finetune", "evaluate"))
    assert float(tags["llmops.metric.pass_at_1"]) == metrics(repo, "eval")["humaneval"]["pass_at_1"]
    assert tags["llmops.git_commit"] == parent.data.tags["llmops.git_commit"]


def test_quantize_logs_the_quantization_table_to_mlflow_and_dvc_metrics(repo, tmp_path):
    repo, _, env, _ = repo
    client, runs = mlflow_runs(repo)
    quantize = next(r for r in runs if r.data.tags.get("llmops.stage") == "quantize")
    quantized = metrics(repo, "quantize")
    assert quantized["w8a8"]["size_ratio"] > 1 and quantized["w4a16"]["size_ratio"] > 1
    assert quantize.data.metrics["w8a8.perplexity_increase"] == pytest.approx(quantized["w8a8"]["perplexity_increase"])
    table = json.loads(Path(client.download_artifacts(quantize.info.run_id, "quantize_table.json", str(tmp_path))).read_text())
    assert [row[table["columns"].index("scheme")] for row in table["data"]][:3] == ["unquantized", "w8a8", "w4a16"]
    assert (repo / "models" / "quantized" / "w8a8" / "config.json").exists()
    shown = sh(BIN / "dvc", "metrics", "show", "--json", "metrics/quantize.json", cwd=repo, env=env).stdout
    assert "metrics/quantize.json" in shown and '"size_ratio"' in shown


def test_dvc_metrics_show_is_the_headline_and_config_is_params_not_metrics(repo):
    repo, _, env, _ = repo
    [(_, workspace)] = json.loads(sh(BIN / "dvc", "metrics", "show", "--json", cwd=repo, env=env).stdout).items()
    assert list(workspace["data"]) == ["metrics/summary.json"]  # one readable row; each stage's file on request
    summary = workspace["data"]["metrics/summary.json"]["data"]
    assert summary["quality"]["pass_at_1"] == metrics(repo, "eval")["humaneval"]["pass_at_1"]
    assert summary["data"]["kept"] == metrics(repo, "dedup")["docs_out"]
    assert sum(len(group) for group in summary.values()) <= 16
    table = sh(BIN / "dvc", "metrics", "show", cwd=repo, env=env).stdout
    assert max(len(line) for line in table.splitlines()) < 600, table
    _, runs = mlflow_runs(repo)
    stage = {r.data.tags.get("llmops.stage"): r for r in runs}
    for name, fact in (("pretrain", "parameters"), ("finetune", "trainable_parameters"), ("tokenize", "vocab_size"), ("dedup", "lsh_bands")):
        assert fact not in stage[name].data.metrics and fact in stage[name].data.params, (name, fact)
    assert stage["pretrain"].data.params["parameters"] == str(metrics(repo, "pretrain")["parameters"])


def test_run_ends_with_the_champion_served_tested_and_in_production(repo):
    repo, _, _, run = repo
    client, runs = mlflow_runs(repo)
    champion = client.get_model_version_by_alias("llmops-code", "champion").version
    assert client.get_model_version_by_alias("llmops-code", "production").version == champion
    deploy = next(r for r in runs if r.data.tags.get("llmops.deploy") == "true")
    assert deploy.info.status == "FINISHED" and deploy.data.tags["llmops.deploy.status"] == "promoted"
    assert deploy.data.metrics["load.errors"] == 0 and deploy.data.metrics["load.tokens_per_s"] > 0
    assert "server stopped" in " ".join(run.stderr.split())


def test_run_ends_with_the_monitor_on_the_held_out_batch_not_flagged_and_tracked(repo):
    repo, _, _, run = repo
    result = metrics(repo, "monitor")
    assert result["drift"] is False, {name: check for name, check in result["checks"].items() if check["flagged"]}
    assert result["near_duplicates_reused_signatures"] is True  # dedup's saved signatures, not the train split hashed again
    client, _ = mlflow_runs(repo)
    experiment = client.get_experiment_by_name("llmops-monitor")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "no drift" in " ".join(run.stderr.split())


def test_outputs_are_pushed_to_the_default_dvc_remote(repo):
    repo, root, env, _ = repo
    assert any((root / "remote").rglob("*"))
    status = sh(BIN / "dvc", "status", "--cloud", cwd=repo, env=env)
    assert "are in sync" in status.stdout


def test_dvc_repro_after_the_flow_reruns_nothing(repo):
    repo, _, env, _ = repo
    out = sh(BIN / "dvc", "repro", cwd=repo, env=env)
    assert "Data and pipelines are up to date." in out.stdout
    assert "Running stage" not in out.stdout


def test_a_param_override_reruns_only_the_stages_downstream_of_it(repo):
    repo, _, env, _ = repo
    out = sh(BIN / "llmops", "run", "--set", "dedup.threshold=0.95", cwd=repo, env=env)
    assert "up to date: ingest, validate" in out.stderr
    assert yaml.safe_load((repo / "params.yaml").read_text())["dedup"]["threshold"] == 0.95
    _, runs = mlflow_runs(repo)
    latest = [r for r in runs if r.data.tags.get("llmops.pipeline") == "true"][-1]
    assert latest.data.tags["llmops.stage.ingest"] == "cached"
    assert latest.data.tags["llmops.stage.dedup"] == "ran"
    assert latest.data.tags["llmops.overrides"] == "dedup.threshold=0.95"


def test_llmops_ui_serves_the_projects_runs_over_http(repo):
    import signal
    import socket
    import time
    import urllib.request

    repo, _, env, _ = repo
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([BIN / "llmops", "ui", "--port", str(port)], cwd=repo, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        body = None
        while time.monotonic() < deadline and body is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=llmops"
                )
                body = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                assert proc.poll() is None, "llmops ui exited before serving"
                time.sleep(1)
        assert body is not None, "llmops ui did not answer within 180 s (MLflow UI start is slow on loaded cores)"
        assert body["experiment"]["name"] == "llmops"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
