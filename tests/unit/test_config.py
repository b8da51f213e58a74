import pytest
import yaml

from llmops.params.load import Params, apply_overrides, load_params, parse_override, parse_params, write_overrides
from llmops.common.errors import ConfigError

from ..conftest import ROOT

pytestmark = pytest.mark.unit


def test_shipped_params_yaml_loads_and_matches_the_models():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields) - {"validate_"} | {"validate"}
    assert params.dedup.threshold == raw["dedup"]["threshold"]
    assert params.validate_.min_pass_rate == raw["validate"]["min_pass_rate"]


def test_unknown_key_names_the_key_path_and_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_params({"dedup": {"treshold": 0.5}})
    message = str(err.value)
    assert "dedup.treshold" in message
    assert "threshold" in message and "num_perm" in message


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="unknown key 'pretrian'.*ingest"):
        parse_params({"pretrian": {}})


def test_mistyped_value_names_the_key_and_the_bad_value():
    with pytest.raises(ConfigError, match=r"dedup\.num_perm.*'many'"):
        parse_params({"dedup": {"num_perm": "many"}})


def test_override_values_are_parsed_as_yaml_scalars():
    assert parse_override("dedup.threshold=0.8") == (["dedup", "threshold"], 0.8)
    assert parse_override("pipeline.push=false") == (["pipeline", "push"], False)
    assert parse_override("ingest.source=/data/x.jsonl") == (["ingest", "source"], "/data/x.jsonl")
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_override("dedup.threshold")


def test_override_of_unknown_key_fails_before_anything_runs():
    with pytest.raises(ConfigError, match="dedup.thresh"):
        parse_params(apply_overrides({}, ["dedup.thresh=0.1"]))


def test_write_overrides_keeps_comments_and_changes_only_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    write_overrides(path, ["dedup.threshold=0.85", "ingest.source=/tmp/corpus.jsonl"])
    text = path.read_text()
    assert "# Every knob of the pipeline" in text
    params = load_params(path)
    assert params.dedup.threshold == 0.85
    assert params.ingest.source == "/tmp/corpus.jsonl"
    assert params.tokenize == load_params(ROOT / "params.yaml").tokenize


def test_write_overrides_refuses_an_invalid_value_and_leaves_the_file_alone(tmp_path):
    path = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    path.write_text(original)
    with pytest.raises(ConfigError, match="dedup.threshold"):
        write_overrides(path, ["dedup.threshold=7"])
    assert path.read_text() == original


def test_paths_resolve_from_the_folder_holding_params_yaml_not_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("paths:\n  raw: data/raw\n  metrics: /abs/metrics\n  allow_outside_root: [metrics]\n")
    monkeypatch.chdir("/")
    params = load_params(tmp_path / "params.yaml")
    assert params.paths.root == tmp_path.resolve()
    assert params.paths.raw == tmp_path.resolve() / "data/raw" and params.paths.tokens == tmp_path.resolve() / "data/tokens"
    assert str(params.paths.metrics) == "/abs/metrics"  # an absolute path stays as it is (outside the root: opted in)
    logged = params.as_params()["paths"]
    assert logged["raw"] == "data/raw" and logged["metrics"] == "/abs/metrics"  # what MLflow and DVC see


def test_pretrain_and_finetune_share_one_optimiser_section_with_their_own_defaults():
    from llmops.params.finetune import FinetuneConfig
    from llmops.params.pretrain import PretrainConfig
    from llmops.params.train import OptimSection
    from llmops.training.runtime import Optim

    for section in (PretrainConfig(lr=0.01, grad_accum=3), FinetuneConfig(lr=0.01, grad_accum=3)):
        assert isinstance(section, OptimSection)
        optim = Optim.of(section, max_steps=7)
        assert (optim.lr, optim.grad_accum, optim.max_steps) == (0.01, 3, 7)
        assert {k: getattr(optim, k) for k in OptimSection.model_fields} == section.model_dump(include=set(OptimSection.model_fields))
    assert (PretrainConfig().batch_size, FinetuneConfig().batch_size) == (16, 8)
    assert (PretrainConfig().weight_decay, FinetuneConfig().weight_decay) == (0.1, 0.0)


def test_params_read_as_dvc_writes_them_yaml_1_2_booleans(tmp_path):
    """`dvc exp run -S` rewrites params.yaml as YAML 1.2, leaving `serve.speculative: off` bare; it must stay the string
    DVC reads, not YAML 1.1's False, both in the file and in --set."""
    from llmops.params.load import load_params, parse_override

    text = (ROOT / "params.yaml").read_text().replace('speculative: "off"', "speculative: off")
    assert "speculative: off" in text
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.serve.speculative == "off"
    assert parse_override("serve.speculative=off") == (["serve", "speculative"], "off")
    assert parse_override("evaluate.compare_base=false") == (["evaluate", "compare_base"], False)
