"""register on the micro project against a real MLflow store (sqlite in tmp_path): lineage tags, the champion gate,
no duplicate versions, loading `models:/NAME@champion`, quantized variants, and a Prefect event that cannot be sent."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from llmops.registry import store as registry
from llmops.params.load import load_params
from llmops.common.errors import RegistryError
from llmops.common.env import PARENT_RUN as PARENT_RUN_ENV
from llmops.common.runner import run_stage

from ..helpers import MICRO, free_port
from ..conftest import store_of
from .conftest import micro_params, write_params

pytestmark = pytest.mark.training

NAME = "micro-code"
EVALUATE = {"seq_len": 32, "eval_tokens": 512, "batch_size": 8, "max_problems": 0}


def save_micro_model(project: Path, out: Path, seed: int) -> Path:
    """An untrained micro Llama with the project's tokenizer; each seed gives different weights (a new version)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

    tokenizer = AutoTokenizer.from_pretrained(project / "models" / "tokenizer")
    set_seed(seed)
    config = AutoConfig.for_model(**MICRO, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_eval(project: Path, perplexity: float, pass_at_1: float) -> None:
    metrics = {"perplexity": {"perplexity": perplexity, "loss": 1.0, "tokens": 100}, "humaneval": {"pass_at_1": pass_at_1, "problems": 4}}
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics" / "eval.json").write_text(json.dumps(metrics))


@pytest.fixture
def proj(project, monkeypatch):
    """The micro project with a model in models/finetune, its own MLflow store, and no pipeline parent run."""
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    write_params(project, micro_params(evaluate=EVALUATE, register={"model_name": NAME, "log_transformers_flavor": False}))
    save_micro_model(project, project / "models" / "finetune", seed=0)
    return project


def register(project: Path, **overrides) -> dict:
    if overrides:
        raw = yaml.safe_load((project / "params.yaml").read_text())
        for section, values in overrides.items():
            raw.setdefault(section, {}).update(values)
        write_params(project, raw)
    run_stage("register", load_params(project / "params.yaml"), track=True)
    return json.loads((project / "metrics" / "register.json").read_text())


def new_model(project: Path, seed: int, perplexity: float, pass_at_1: float) -> None:
    shutil.rmtree(project / "models" / "finetune")
    save_micro_model(project, project / "models" / "finetune", seed=seed)
    write_eval(project, perplexity, pass_at_1)


def test_first_version_becomes_champion_with_lineage_tags(proj):
    import mlflow

    from llmops.common import tracking

    params = load_params(proj / "params.yaml")
    experiment_id = tracking.setup(params.tracking, params.paths.root)
    client = mlflow.MlflowClient()
    parent = client.create_run(experiment_id, tags={"prefect.flow_run_id": "flow-run-123"}, run_name="pipeline").info.run_id
    evaluate_run = client.create_run(experiment_id, tags={"llmops.stage": "evaluate"}, run_name="evaluate").info.run_id
    client.set_terminated(evaluate_run, "FINISHED")
    lock = {"schema": "2.0", "stages": {"tokenize": {"cmd": "x", "outs": [{"path": "data/tokens", "md5": "abc.dir", "size": 1}]}}}
    (proj / "dvc.lock").write_text(yaml.safe_dump(lock))
    write_eval(proj, perplexity=250.0, pass_at_1=0.0)

    os.environ[PARENT_RUN_ENV] = parent
    try:
        result = register(proj)
    finally:
        del os.environ[PARENT_RUN_ENV]

    assert result["decision"] == "promoted" and result["version"] == "1" and result["champion_after"] == "1"
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == str(version.version) == "1"
    tags = version.tags
    assert tags["llmops.git_commit"]
    assert tags["llmops.pipeline_run_id"] == parent
    assert tags["llmops.prefect_flow_run_id"] == "flow-run-123"
    assert tags["llmops.dvc.data/tokens"] == "abc.dir"
    assert tags["llmops.run.evaluate"] == evaluate_run
    assert float(tags["llmops.metric.perplexity"]) == 250.0 and float(tags["llmops.metric.pass_at_1"]) == 0.0
    assert tags["llmops.eval_data"] == result["eval_data"] and len(tags["llmops.eval_data"]) == 32
    assert tags["llmops.params_md5"] == hashlib.md5((proj / "params.yaml").read_bytes()).hexdigest()
    register_run = client.get_run(version.run_id)
    assert register_run.data.tags["llmops.stage"] == "register" and register_run.data.tags["mlflow.parentRunId"] == parent
    assert register_run.data.tags["llmops.gate.decision"] == "promoted"
    assert "params.yaml" in {a.path for a in client.list_artifacts(version.run_id)}


def test_better_challenger_is_promoted(proj):
    write_eval(proj, perplexity=250.0, pass_at_1=0.0)
    assert register(proj)["decision"] == "promoted"
    new_model(proj, seed=1, perplexity=200.0, pass_at_1=0.25)
    result = register(proj)
    assert result["decision"] == "promoted" and result["version"] == "2"
    assert result["champion_before"]["metrics"] == {"perplexity": 250.0, "pass_at_1": 0.0}
    assert result["champion_before"]["source"].startswith("version tags")
    assert result["checks"] == {"pass_at_1": True, "perplexity": True}
    params = load_params(proj / "params.yaml")
    assert registry.alias_version(NAME, "champion", store_of(params)) == "2"


def test_worse_challenger_is_refused_and_the_champion_stays(proj):
    write_eval(proj, perplexity=200.0, pass_at_1=0.25)
    register(proj)
    new_model(proj, seed=2, perplexity=190.0, pass_at_1=0.10)
    result = register(proj)
    params = load_params(proj / "params.yaml")
    assert result["decision"] == "refused" and result["promoted"] is False
    assert result["checks"] == {"pass_at_1": False, "perplexity": True}
    assert any("pass@1 0.1000 vs champion 0.2500" in r and "FAIL" in r for r in result["reasons"])
    assert registry.alias_version(NAME, "champion", store_of(params)) == "1"
    assert registry.alias_version(NAME, "challenger", store_of(params)) == "2"
    assert "refused" in (proj / "metrics" / "register.json").read_text()


def test_rerun_with_the_same_model_adds_no_version(proj):
    write_eval(proj, perplexity=250.0, pass_at_1=0.0)
    register(proj)
    again = register(proj, register={"gate": {"max_perplexity_increase": 0.1}})  # a params change re-runs the stage
    assert again["version"] == "1" and again["reused_version"] is True
    assert again["decision"] == "kept (already champion)"
    params = load_params(proj / "params.yaml")
    assert [str(v.version) for v in registry.client(store_of(params)).search_model_versions(f"name = '{NAME}'")] == ["1"]


def test_champion_on_other_eval_data_is_rescored_on_the_current_data(proj):
    from llmops.evaluation.suite import held_out_perplexity

    write_eval(proj, perplexity=1.0, pass_at_1=0.0)  # an impossible perplexity, on "old" eval data
    register(proj)
    champion_dir = proj / "champion-copy"
    shutil.copytree(proj / "models" / "finetune", champion_dir)
    new_model(proj, seed=3, perplexity=5000.0, pass_at_1=0.0)
    result = register(proj, evaluate={"eval_tokens": 256})  # other eval data: the fingerprint changes

    params = load_params(proj / "params.yaml")
    expected = held_out_perplexity(champion_dir, params.paths.tokens, params.evaluate, "test")["perplexity"]
    assert result["champion_before"]["source"] == "re-scored now on the current eval data"
    assert result["champion_before"]["metrics"]["perplexity"] == pytest.approx(expected)
    assert 100 < expected < 1000  # an untrained model over a 300-token vocabulary: not the 1.0 its tags claim
    assert result["decision"] == "refused"  # 5000 > the re-scored perplexity * 1.05
    tags = registry.client(store_of(params)).get_model_version(NAME, "1").tags
    assert json.loads(tags[f"llmops.eval.{result['eval_data']}"])["perplexity"] == pytest.approx(expected)


def test_champion_loads_as_a_transformers_pipeline_and_as_a_local_hf_directory(proj):
    import mlflow
    from transformers import AutoModelForCausalLM

    write_eval(proj, perplexity=250.0, pass_at_1=0.0)
    register(proj, register={"log_transformers_flavor": True})
    params = load_params(proj / "params.yaml")

    pipe = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    out = pipe("def add(a, b):", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("def add(a, b):") and len(out[0]["generated_text"]) > len("def add(a, b):")

    ref = registry.resolve(f"{NAME}@champion", store_of(params))
    assert ref.path == Path(params.paths.registry) / NAME / "1" and ref.version == "1" and ref.tags["llmops.metric.perplexity"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in ref.path.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(ref.path)
    assert model.config.hidden_size == MICRO["hidden_size"]
    stamp = (ref.path / "model.safetensors").stat().st_mtime_ns
    assert registry.resolve(f"models:/{NAME}@1", store_of(params)).path == ref.path
    assert (ref.path / "model.safetensors").stat().st_mtime_ns == stamp  # the complete download is reused


def test_quantized_variants_are_linked_versions(proj):
    # A plain copy stands in for a compressed-tensors checkpoint: registering does not look inside the weights.
    quantized = proj / "models" / "quantized" / "w8a8"
    shutil.copytree(proj / "models" / "finetune", quantized)
    (proj / "metrics" / "quantize.json").parent.mkdir(exist_ok=True)
    (proj / "metrics" / "quantize.json").write_text(json.dumps({"w8a8": {"size_ratio": 0.5}}))
    write_eval(proj, perplexity=250.0, pass_at_1=0.0)
    result = register(proj, register={"log_transformers_flavor": True})
    assert result["quantized"] == {"w8a8": {"name": f"{NAME}-w8a8", "version": "1"}}
    params = load_params(proj / "params.yaml")
    ref = registry.resolve(f"{NAME}@champion", store_of(params), quantized="w8a8")
    assert ref.name == f"{NAME}-w8a8" and ref.tags["llmops.base_version"] == "1"
    assert float(ref.tags["llmops.metric.quantize.size_ratio"]) == 0.5
    assert (ref.path / "config.json").read_text() == (quantized / "config.json").read_text()
    with pytest.raises(RegistryError, match="no registered w4a16 variant"):
        registry.resolve(f"{NAME}@champion", store_of(params), quantized="w4a16")
    listed = {(row["name"], row["version"]): row for row in registry.list_versions(NAME, store_of(params))}
    assert set(listed) == {(NAME, "1"), (f"{NAME}-w8a8", "1")}
    # no gate ran on the variant: no gate alias; its logged model carries its own numbers, not the base's
    assert listed[(f"{NAME}-w8a8", "1")]["aliases"] == "" and listed[(f"{NAME}-w8a8", "1")]["base_version"] == "1"
    import mlflow

    client = mlflow.MlflowClient(store_of(params).uri)
    variant = client.get_model_version(f"{NAME}-w8a8", "1")
    assert "not gated" in variant.description
    base = client.get_model_version(NAME, "1")
    assert base.description.startswith("Gate promoted: perplexity 250") and f"{NAME}-w8a8 v1" in base.description
    assert "llmops pipeline" in client.get_registered_model(NAME).description
    model_id = variant.model_id or variant.source.removeprefix("models:/")  # the logged model the version was made from
    variant_metrics = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert variant_metrics["size_ratio"] == 0.5 and "perplexity" not in variant_metrics  # 250.0 is the base's


def test_unreachable_prefect_api_does_not_fail_the_stage(proj, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    write_eval(proj, perplexity=250.0, pass_at_1=0.0)
    result = register(proj)
    assert result["decision"] == "promoted"
    assert result["event"].startswith("not sent: Prefect API") and "unreachable" in result["event"]
