"""`dvc exp show --only-changed` compares two experiments on the project's dvc.yaml and params.yaml: the param that was
varied and the headline metrics (metrics/summary.json) that moved, in a table that fits a terminal.

Only the cheap stages run (ingest, validate, dedup, tokenize, then summary); the training and evaluation stages' metrics
files are fixed numbers committed with the repository, as a previous run would have left them.
"""

import json

import pytest

from ..helpers import BIN, make_repo, sh, subprocess_env

pytestmark = pytest.mark.e2e

CHEAP_STAGES = ("ingest", "validate", "dedup", "tokenize", "summary")
# What pretrain, finetune and evaluate would have written: summary reads them; these stages never run here.
EARLIER_METRICS = {
    "pretrain.json": {"eval_loss": 5.1, "tokens": 1536, "train_seconds": 2.0},
    "finetune.json": {"eval_loss": 4.2, "tokens": 512, "train_seconds": 1.0},
    "eval.json": {"perplexity": {"perplexity": 90.5}, "humaneval": {"pass_at_1": 0.0}},
}
# The tiny corpus holds one exact and one edited copy of a file: at 0.5 the edited copy is a near duplicate, at 0.99 not.
THRESHOLDS = {"loose": 0.5, "strict": 0.99}
MAX_WIDTH = 200


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    """A committed baseline run of the cheap stages, then one experiment per dedup threshold; `dvc exp show` of them."""
    root = tmp_path_factory.mktemp("experiments")
    env = subprocess_env(root)
    repo = make_repo(root, env)
    (repo / "metrics").mkdir()
    for name, metrics in EARLIER_METRICS.items():
        (repo / "metrics" / name).write_text(json.dumps(metrics))
    sh(BIN / "dvc", "repro", "--single-item", *CHEAP_STAGES, cwd=repo, env=env, timeout=900)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "baseline run", cwd=repo)
    for name, value in THRESHOLDS.items():
        # -S rewrites params.yaml as YAML 1.2 (a bare `off` among the rest), which the stages must read as DVC does
        sh(BIN / "dvc", "exp", "run", "-S", f"dedup.threshold={value}", "--single-item", "--name", name, *CHEAP_STAGES, cwd=repo, env=env, timeout=900)
    shown = {
        "md": sh(BIN / "dvc", "exp", "show", "--only-changed", "--md", "--no-pager", cwd=repo, env=env).stdout,
        "json": json.loads(sh(BIN / "dvc", "exp", "show", "--only-changed", "--json", cwd=repo, env=env).stdout),
    }
    return shown


def md_table(md: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(column names, {experiment name: {column: cell}}) of `dvc exp show --md`."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rows = split[0], split[2:]
    by_name = {}
    for row in rows:
        named = row[0].rsplit("[", 1)[-1].rstrip("]") if row[0].endswith("]") else "baseline"  # the baseline: the branch's row
        if row[0] != "workspace":
            by_name[named] = dict(zip(header, row, strict=True))
    return header, by_name


def test_only_changed_lists_the_varied_param_and_the_headline_metrics_that_moved(experiments):
    header, rows = md_table(experiments["md"])
    assert set(rows) == {"baseline", "loose", "strict"}, experiments["md"]
    assert "dedup.threshold" in header and [rows[n]["dedup.threshold"] for n in ("baseline", "loose", "strict")] == ["0.7", "0.5", "0.99"]
    loose, strict = rows["loose"], rows["strict"]
    assert int(strict["data.kept"]) == int(loose["data.kept"]) + 1, "the edited copy is kept at 0.99, removed at 0.5"
    assert int(strict["data.duplicates"]) == int(loose["data.duplicates"]) - 1
    assert int(strict["data.train_tokens"]) > int(loose["data.train_tokens"])
    # unchanged params and metrics are left out: the other dedup knobs, every other section, the fixed training numbers
    for unchanged in ("dedup.num_perm", "tokenize.vocab_size", "data.records_in", "quality.perplexity", "cost.pretrain_tokens"):
        assert unchanged not in header, unchanged


def test_only_changed_fits_a_terminal_and_abbreviates_nothing(experiments):
    md = experiments["md"]
    widths = [len(line) for line in md.splitlines()]
    assert max(widths) < MAX_WIDTH, f"{max(widths)} columns:\n{md}"
    assert "…" not in md


def test_json_holds_each_experiments_param_and_headline_metrics(experiments):
    [baseline] = [entry for entry in experiments["json"] if entry["rev"] != "workspace"]
    revs = {rev["name"]: rev["data"] for exp in baseline["experiments"] for rev in exp["revs"]}
    assert set(revs) == set(THRESHOLDS), list(revs)
    for name, value in THRESHOLDS.items():
        assert revs[name]["params"]["params.yaml"]["data"]["dedup"]["threshold"] == value
        summary = revs[name]["metrics"]["metrics/summary.json"]["data"]
        assert summary["data"]["kept"] == baseline["data"]["metrics"]["metrics/summary.json"]["data"]["data"]["kept"] + (1 if name == "strict" else 0)
        assert summary["quality"]["perplexity"] == EARLIER_METRICS["eval.json"]["perplexity"]["perplexity"], "the fixed training numbers pass through"
