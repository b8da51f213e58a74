"""Helpers the e2e and integration tests share: a temporary git+DVC copy of the project on a tiny corpus, subprocesses, ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

from llmops.data.sources import stdlib_root

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A 2-layer Llama of ~28k parameters: training tests and the tiny-corpus repos train it in seconds.
MICRO = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
    # The context the served model declares: the proxy refuses prompt + max_tokens beyond it, and the deploy smoke and
    # load tests send ~30-token prompts (training still uses pretrain.seq_len blocks).
    "max_position_embeddings": 256,
}
CORPUS_FILES = sorted((stdlib_root() / "json").glob("*.py")) + sorted((stdlib_root() / "email").glob("*.py"))[:20]


def sh(*cmd, cwd, env=None, check=True, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def make_corpus(root: Path) -> Path:
    """The tiny corpus: stdlib files plus one exact duplicate, one near duplicate and one empty (quarantined) file."""
    corpus = root / "corpus"
    corpus.mkdir()
    for path in CORPUS_FILES:
        shutil.copy(path, corpus / f"{path.parent.name}_{path.name}")
    decoder = (corpus / "json_decoder.py").read_text()
    (corpus / "decoder_copy.py").write_text(decoder + "\n\n")  # exact duplicate (trailing whitespace only)
    (corpus / "decoder_edit.py").write_text(decoder.replace("def ", "def  ", 3).replace("return", "return  ", 2) + "\nX = 1\n")
    (corpus / "empty.py").write_text("")  # quarantined
    return corpus


def subprocess_env(root: Path) -> dict[str, str]:
    """The environment a test's subprocesses get: this venv on PATH, its own PREFECT_HOME, no inherited MLflow URI."""
    env = os.environ | {"PREFECT_HOME": str(root / "prefect"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "LLMOPS_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def make_repo(root: Path, env: dict[str, str], files: Iterable[str] = (), dirs: Iterable[str] = ("tasks", "llmops"), tiny_corpus: bool = True) -> Path:
    """A git+DVC repository under `root` holding dvc.yaml, the given project files and dirs, and params.yaml
    (set for the tiny corpus, or the project's own defaults when `tiny_corpus` is False).

    The first commit exists (DVC experiments and the MLflow git tag need it); a local directory is the DVC default remote.
    """
    repo = root / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", *files):
        shutil.copy(ROOT / name, repo / name)
    for name in dirs:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    if tiny_corpus:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["ingest"]["source"] = str(make_corpus(root))
        params["tokenize"]["vocab_size"] = 512
        params["validate"]["min_pass_rate"] = 0.5
        params["pretrain"].update(preset="micro", seq_len=32, batch_size=4, token_budget=4 * 32 * 12, eval_tokens=1024)
        params["pretrain"]["presets"]["micro"] = MICRO
        params["finetune"].update(max_steps=4, max_eval_pairs=8, max_train_pairs=64, batch_size=4)
        params["evaluate"].update(seq_len=32, eval_tokens=1024, batch_size=8, max_problems=2, max_new_tokens=8, max_pairs=3, timeout_s=3.0)
        params["quantize"].update(calibration_samples=8, calibration_seq_len=32, latency_prompt_tokens=8, latency_new_tokens=8, latency_repeats=2)
        params["serve"].update(port=0, load_requests=8, load_max_tokens=8, smoke_max_tokens=4, cb_num_blocks=32)
        params["align"].update(max_prompts=4, max_eval_prompts=2, max_examples=2, samples_per_prompt=1, max_new_tokens=16, max_steps=2, batch_size=2, max_seq_len=128)
        params["distill"].update(num_layers=1, max_steps=4, max_train_pairs=64, max_eval_pairs=8, batch_size=4, humaneval_problems=2,
                                 speed_new_tokens=8, speed_repeats=1, speculative_prompts=2, speculative_new_tokens=8)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    else:
        shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    sh("git", "init", "-q", cwd=repo)
    sh("git", "config", "user.email", "t@example.com", cwd=repo)
    sh("git", "config", "user.name", "test", cwd=repo)
    sh(BIN / "dvc", "init", "-q", cwd=repo, env=env)
    sh(BIN / "dvc", "remote", "add", "-d", "local", str(root / "remote"), cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "init", cwd=repo)
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_tree(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """Stop a process started with start_new_session=True, its process group and every descendant, even ones in sessions of their own.

    SIGTERM first so servers shut down cleanly, SIGKILL for whatever is left after `timeout_s` (the serving code's own helper).
    """
    from llmops.serving.server import stop_process_group

    stop_process_group(proc, timeout_s)
