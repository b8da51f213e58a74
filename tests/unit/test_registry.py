"""llmops/registry without a model: spec parsing, names, local directories, the errors for what does not exist, and how
reproduce restores (and verifies) a data version from the DVC cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmops.common.fingerprints import file_md5
from llmops.registry import reproduce
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


def test_resolve_returns_a_lora_adapter_directory_as_is(tmp_path):
    """vLLM serves an adapter with --enable-lora; its base comes from adapter_config.json."""
    (tmp_path / "adapter_config.json").write_text("{}")
    assert registry.resolve(str(tmp_path), store_at(tmp_path)).path == tmp_path
    with pytest.raises(RegistryError):
        registry.resolve(str(tmp_path), store_at(tmp_path), quantized="w8a8")


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


def _dvc_repo_with_a_cached_version(root: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A git+DVC repository whose one stage wrote a directory and a file into the cache: (repo, versions, env)."""
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    repo = root / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: mkdir -p out && echo hello > out/a.txt && echo world > out/b.txt && echo one > one.txt\n"
        "    outs:\n      - out\n      - one.txt\n"
    )
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], [sys.executable, "-m", "dvc", "repro", "-q"],
                ["git", "add", "dvc.yaml", ".dvc", ".gitignore"], ["git", "commit", "-qm", "stage"]):  # fmt: skip
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return repo, {o["path"]: o["md5"] for o in lock["stages"]["make"]["outs"]}, env


def test_reproduce_refuses_a_cache_object_changed_in_place_and_restores_nothing(tmp_path):
    repo, versions, env = _dvc_repo_with_a_cached_version(tmp_path)
    cache = repo / ".dvc" / "cache"
    listing = json.loads(reproduce.cache_object(cache, versions["out"]).read_text())
    expected = next(e["md5"] for e in listing if e["relpath"] == "a.txt")
    damaged = reproduce.cache_object(cache, expected)
    os.chmod(damaged, 0o644)  # DVC makes cache files read-only; a tool that overwrites them in place does this
    damaged.write_text("tampered\n")
    worktree = reproduce.create_worktree(repo, "HEAD", tmp_path / "worktree")

    with pytest.raises(reproduce.ReproduceError) as err:
        reproduce.restore_data(repo, worktree, versions, env)
    message = str(err.value)
    assert "out/a.txt" in message and expected in message and file_md5(damaged) in message
    assert not (worktree / "out").exists() and not (worktree / "one.txt").exists(), "a damaged version restores nothing"


def test_reproduce_restores_an_intact_version_byte_for_byte(tmp_path):
    repo, versions, env = _dvc_repo_with_a_cached_version(tmp_path)
    worktree = reproduce.create_worktree(repo, "HEAD", tmp_path / "worktree")
    assert sorted(reproduce.restore_data(repo, worktree, versions, env)) == ["one.txt", "out"]
    assert (worktree / "out" / "a.txt").read_text() == "hello\n" and (worktree / "one.txt").read_text() == "one\n"
