import subprocess

import pytest

from llmops.common.io import atomic_dir

from ..conftest import ROOT

pytestmark = pytest.mark.unit


def test_atomic_dir_keeps_the_previous_output_when_the_writer_fails(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (out / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_help_lists_the_commands_quickly():
    out = subprocess.run([str(ROOT / ".venv/bin/llmops"), "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "stage", "ui"):
        assert command in out.stdout


def test_cli_unknown_stage_is_one_clear_error_line(tmp_path):
    out = subprocess.run([str(ROOT / ".venv/bin/llmops"), "stage", "pretrian", "--params", str(ROOT / "params.yaml"), "--no-track"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1
    assert "unknown stage 'pretrian'" in out.stderr and "Traceback" not in out.stderr


def test_cli_bad_params_key_fails_fast_naming_it(tmp_path):
    (tmp_path / "params.yaml").write_text("dedup:\n  treshold: 0.5\n")
    out = subprocess.run([str(ROOT / ".venv/bin/llmops"), "stage", "dedup", "--no-track"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1 and "dedup.treshold" in out.stderr


def test_cli_run_help_says_set_values_stay_in_params_yaml():
    out = subprocess.run([str(ROOT / ".venv/bin/llmops"), "run", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(out.stdout.replace("│", " ").split())
    assert "Written into params.yaml and kept there" in text and "for this run" not in text
