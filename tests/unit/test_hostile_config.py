"""Hostile params.yaml and --set values: each is refused with one clear error, and nothing is deleted or rewritten."""

import os
import subprocess

import pyarrow as pa
import pytest
import yaml

import llmops.common.io as io_lib
from llmops.common.errors import ConfigError, StageError
from llmops.params.dedup import DedupConfig
from llmops.params.load import load_params, parse_override, write_overrides
from tasks import dedup

from ..conftest import ROOT, project_paths

pytestmark = pytest.mark.unit

LLMOPS = ROOT / ".venv/bin/llmops"
BAD_OVERRIDES = {
    "invalid YAML": "dedup.threshold=[1,",
    "unknown key": "dedup.treshold=0.5",
    "value out of range": "dedup.threshold=7",
    "path outside the repository": "paths.dedup=../victim",
    "key under a value": "dedup.threshold.max=1",
}


def repo_with_params(root, paths=None):
    """A folder holding the shipped params.yaml, with `paths` entries changed."""
    repo = root / "repo"
    repo.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(paths or {})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def foreign_dir(path):
    """A folder no stage wrote, holding a file someone cares about."""
    path.mkdir(parents=True)
    (path / "important.txt").write_text("keep me\n")
    return path


def write_validated(directory):
    texts = [f"def f{i}(x):\n    return x + {i}\n" * 3 for i in range(4)]
    table = pa.table(
        {"id": [f"d{i}" for i in range(4)], "text": texts, "source": ["t"] * 4, "meta": ["{}"] * 4, "ingest_error": [None] * 4},
        schema=io_lib.RECORD_SCHEMA,
    )
    io_lib.write_records(directory, table, shard_max_bytes=1 << 20)


def llmops(*args, cwd):
    env = os.environ | {"PREFECT_HOME": str(cwd / ".prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    return subprocess.run([str(LLMOPS), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_path_outside_the_repository_is_refused_naming_key_value_and_rule(tmp_path):
    repo = repo_with_params(tmp_path, {"dedup": "../victim"})
    with pytest.raises(ConfigError) as err:
        load_params(repo / "params.yaml")
    message = str(err.value)
    assert "paths.dedup" in message and "'../victim'" in message and "below the repository root" in message


def test_a_path_leaving_the_repository_through_a_symlink_is_refused(tmp_path):
    repo = repo_with_params(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (repo / "data").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"paths\.dedup: 'data/dedup' resolves to .*elsewhere/dedup, outside the repository root"):
        load_params(repo / "params.yaml")


def test_a_path_naming_the_repository_root_itself_is_refused(tmp_path):
    repo = repo_with_params(tmp_path, {"reports": "."})
    with pytest.raises(ConfigError, match=r"paths\.reports: '\.' is the repository root itself"):
        load_params(repo / "params.yaml")


def test_a_key_listed_in_allow_outside_root_may_resolve_outside(tmp_path):
    repo = repo_with_params(tmp_path, {"checkpoints": str(tmp_path / "scratch"), "allow_outside_root": ["checkpoints"]})
    assert load_params(repo / "params.yaml").paths.checkpoints == tmp_path / "scratch"


def test_allow_outside_root_accepts_only_paths_keys(tmp_path):
    repo = repo_with_params(tmp_path, {"allow_outside_root": ["checkpoint"]})
    with pytest.raises(ConfigError, match="paths.allow_outside_root.*checkpoint is not a paths key"):
        load_params(repo / "params.yaml")


def test_a_stage_refuses_to_replace_a_directory_it_did_not_write(tmp_path):
    write_validated(tmp_path / "validated")
    notes = foreign_dir(tmp_path / "notes")
    with pytest.raises(StageError, match=r"notes: exists, is not empty and has no \.llmops-output file"):
        dedup.run(DedupConfig(workers=1), project_paths(tmp_path, validated="validated", dedup="notes", duplicates="dups"))
    assert (notes / "important.txt").read_text() == "keep me\n"


def test_replacing_a_foreign_directory_after_the_work_keeps_both_and_names_the_new_output(tmp_path):
    notes = foreign_dir(tmp_path / "model")
    finished = tmp_path / ".model.tmp-final"  # how a training stage hands over its finished model
    finished.mkdir()
    (finished / "config.json").write_text("{}")
    with pytest.raises(StageError, match=r"refusing to replace.*The new output is left at .*\.model\.tmp-final"):
        io_lib.replace_dir(finished, notes)
    assert (notes / "important.txt").read_text() == "keep me\n" and (finished / "config.json").exists()


def test_a_stage_replaces_its_own_earlier_output_and_an_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    for version in ("v1", "v2"):
        with io_lib.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text(version)
    assert (tmp_path / "out" / "a.txt").read_text() == "v2"


def test_an_output_path_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
    target = foreign_dir(tmp_path / "target")
    (tmp_path / "out").symlink_to(target)
    with pytest.raises(StageError, match="out: is a symlink"):
        with io_lib.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("new")
    assert (tmp_path / "out").resolve() == target and (target / "important.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]


def test_an_output_path_that_is_a_file_is_refused_and_kept(tmp_path):
    (tmp_path / "out").write_text("a file\n")
    with pytest.raises(StageError, match="out: is a file"):
        with io_lib.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("new")
    assert (tmp_path / "out").read_text() == "a file\n"


def test_a_set_value_that_is_not_yaml_is_a_config_error_naming_key_value_and_problem():
    with pytest.raises(ConfigError) as err:
        parse_override("dedup.threshold=[1,")
    message = str(err.value)
    assert "dedup.threshold" in message and "'[1,'" in message and "not valid YAML" in message and "found '<stream end>'" in message


@pytest.mark.parametrize("override", BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_write_overrides_leaves_params_yaml_byte_identical_when_an_override_is_bad(tmp_path, override):
    repo = repo_with_params(tmp_path)
    before = (repo / "params.yaml").read_bytes()
    with pytest.raises(ConfigError):
        write_overrides(repo / "params.yaml", ["dedup.seed=5", override])
    assert (repo / "params.yaml").read_bytes() == before


def test_cli_stage_with_a_path_outside_the_repository_is_an_error_line_and_deletes_nothing(tmp_path):
    repo = repo_with_params(tmp_path, {"dedup": "../victim"})
    write_validated(repo / "data" / "validated")
    victim = foreign_dir(tmp_path / "victim")
    out = llmops("stage", "dedup", "--no-track", cwd=repo)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    [line] = error_lines(out.stderr)
    assert "paths.dedup" in line and "'../victim'" in line and "below the repository root" in line
    assert (victim / "important.txt").read_text() == "keep me\n"


def test_cli_error_line_keeps_text_in_square_brackets(tmp_path):
    (tmp_path / "params.yaml").write_text("dedup:\n  threshold: '[red]high'\n")
    out = llmops("stage", "dedup", "--no-track", cwd=tmp_path)
    [line] = error_lines(out.stderr)
    assert out.returncode == 1 and "dedup.threshold" in line and "'[red]high'" in line


def test_cli_run_with_a_set_value_that_is_not_yaml_is_one_error_line_and_exit_2(tmp_path):
    repo = repo_with_params(tmp_path)
    out = llmops("run", "--set", "dedup.threshold=[1,", cwd=repo)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    [line] = error_lines(out.stderr)
    assert "dedup.threshold" in line and "'[1,'" in line and "not valid YAML" in line


@pytest.mark.parametrize("override", BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_cli_run_with_a_bad_set_fails_before_running_and_leaves_params_yaml_byte_identical(tmp_path, override):
    repo = repo_with_params(tmp_path)
    victim = foreign_dir(tmp_path / "victim")
    before = (repo / "params.yaml").read_bytes()
    out = llmops("run", "--set", "dedup.seed=5", "--set", override, cwd=repo)
    assert out.returncode == 2 and len(error_lines(out.stderr)) == 1 and "Traceback" not in out.stderr
    assert (repo / "params.yaml").read_bytes() == before
    assert (victim / "important.txt").read_text() == "keep me\n"


def test_cli_run_refuses_a_foreign_directory_at_an_output_path_before_dvc_deletes_it(tmp_path):
    repo = repo_with_params(tmp_path, {"dedup": "notes"})
    notes = foreign_dir(repo / "notes")
    out = llmops("run", "--to", "dedup", cwd=repo)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    [line] = error_lines(out.stderr)
    assert "stage dedup" in line and "notes: exists, is not empty and has no .llmops-output file" in line
    assert (notes / "important.txt").read_text() == "keep me\n"
