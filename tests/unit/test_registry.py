"""llmops/registry/store.py without a model: spec parsing, names, local directories, and the errors for what does not exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmops.registry import store as registry
from llmops.params.load import parse_params
from llmops.common.errors import RegistryError
from llmops.params.paths import PathsConfig
from llmops.params.tracking import TrackingConfig

pytestmark = pytest.mark.unit


def store_at(root):
    return registry.Store.of(TrackingConfig(), PathsConfig().under(root))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("llmops-code@champion", ("llmops-code", "champion")),
        ("llmops-code@3", ("llmops-code", "3")),
        ("models:/llmops-code@production", ("llmops-code", "production")),
        ("models:/llmops-code/7", ("llmops-code", "7")),
        ("llmops-code-w8a8@challenger", ("llmops-code-w8a8", "challenger")),
    ],
)
def test_parse_spec_reads_name_and_alias_or_version(spec, expected):
    assert registry.parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["llmops-code", "@champion", "llmops-code@", "models:/llmops-code"])
def test_parse_spec_rejects_a_spec_without_name_and_alias(spec):
    with pytest.raises(RegistryError, match="expected NAME@ALIAS or NAME@VERSION"):
        registry.parse_spec(spec)


def test_model_name_adds_the_lower_case_scheme_for_quantized_variants():
    params = parse_params({"register": {"model_name": "coder"}})
    assert registry.model_name(params.register) == "coder"
    assert registry.model_name(params.register, "W8A8") == "coder-w8a8"


def test_model_name_must_be_a_valid_registry_name():
    from llmops.common.errors import ConfigError

    with pytest.raises(ConfigError, match="register.model_name"):
        parse_params({"register": {"model_name": "bad name/with slash"}})


def test_resolve_returns_a_local_model_directory_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    ref = registry.resolve(str(tmp_path), store_at(tmp_path))
    assert ref == registry.ModelRef(name="", version="", path=tmp_path, run_id="", tags={})


def test_resolve_rejects_a_directory_without_config_json(tmp_path):
    with pytest.raises(RegistryError, match="not a model directory"):
        registry.resolve(str(tmp_path), store_at(tmp_path))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return store_at(tmp_path)


def test_unknown_model_and_unknown_alias_are_clear_registry_errors(store):
    import mlflow

    with pytest.raises(RegistryError, match="registered model 'nothing' does not exist"):
        registry.resolve("nothing@champion", store)
    assert registry.alias_version("nothing", "champion", store) is None

    mlflow.MlflowClient().create_registered_model("empty")
    with pytest.raises(RegistryError, match=r"'empty' has no alias 'champion' \(aliases: none\)"):
        registry.resolve("empty@champion", store)
    with pytest.raises(RegistryError, match="'empty' has no version 4"):
        registry.resolve("models:/empty/4", store)
    assert registry.alias_version("empty", "champion", store) is None


def test_reserved_version_aliases_are_refused():
    with pytest.raises(RegistryError, match="v<number> is reserved"):
        registry.set_alias("anything", "v3", "1", store_at(Path(".")))


def test_resolve_finds_a_scheme_subdirectory_of_a_local_directory_and_refuses_a_missing_one(tmp_path):
    (tmp_path / "w8a8").mkdir()
    (tmp_path / "w8a8" / "config.json").write_text("{}")
    store = store_at(tmp_path)
    assert registry.resolve(str(tmp_path), store, quantized="W8A8").path == tmp_path / "w8a8"
    with pytest.raises(RegistryError, match="no w4a16/ subdirectory"):
        registry.resolve(str(tmp_path / "w8a8"), store, quantized="w4a16")
