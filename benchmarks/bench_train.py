"""Tokens/s of our pretrain stage against a bare transformers Trainer loop on the same model, data and steps.

Both sides train the `pretrain.preset` model of params.yaml (tiny by default) from scratch on the repo's
data/tokens train split (its token shards, read through llmops.data.token_shards) with the same seed, batch_size, seq_len, lr schedule and number of optimizer steps,
on the CPU of this machine:

  ours    the real stage: `llmops.common.runner.run_stage("pretrain", params, track=True)`, in a temp project dir
          (data/tokens and models/tokenizer symlinked to the repo's, a params.yaml with only
          pretrain.token_budget changed so the run is --steps optimizer steps) with MLflow tracking to a
          temp sqlite store (MLFLOW_TRACKING_URI), per-step metrics, checkpoints every train.save_every
          steps with completion markers, the held-out eval, the final save, the loss curve, artifact logging.
  bare    AutoConfig.for_model + AutoModelForCausalLM.from_config, a 20-line Dataset of seq_len blocks over
          the same token shards (same seeded block order), TrainingArguments(report_to="none", save_strategy="no",
          same logging_steps/lr/schedule/batch/max_steps, use_cpu=True) and Trainer(...).train(). Nothing else.
  litgpt  (peer, optional) litgpt's own `litgpt.pretrain.setup` recipe (Fabric loop, torch.compile, which
          it always applies, one final eval over as many batches as ours scores, its final checkpoint) on a
          litgpt Config with the same layers/heads/kv-heads/hidden/intermediate/vocab/tied embeddings, fed the
          same seeded token blocks by a small DataModule; run from its own venv (see "Peer setup"). Also
          reported: the sum of its printed per-step times (steps only; compile lands in step 1).

Every measurement is a fresh child process; the child imports torch/transformers/mlflow/matplotlib
(and litgpt) first, so import and process start are excluded, then times only the training call:
`run_stage(...)` for ours (everything the stage does, setup to artifact logging), `trainer.train()` for
bare, `litgpt.pretrain.setup(...)` for litgpt. tokens/s = steps x batch_size x seq_len / that wall time.
For ours the child also times the pieces (timing wrappers installed around functions, no code changed):
the Trainer's train() (= the stage's own `train_seconds`), checkpoint saves inside it, the eval, the final
save, the loss curve, MLflow run setup and artifact logging, so the breakdown adds up to the total.

Sides are interleaved (ours, bare[, litgpt], ours, bare, ...) so load from other work on this shared
machine hits both alike; the table reports the median per side, the spread (min-max) and the ratios.

Run from the repository root:

    .venv/bin/python benchmarks/bench_train.py                      # 3 repeats x 30 steps (~40 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_train.py --repeats 5 --steps 60
    .venv/bin/python benchmarks/bench_train.py --profile            # + one cProfile'd run of ours (top functions)

Prints a markdown table and writes benchmarks/results/bench_train.json (gitignored).

Peer setup (litgpt; optional: skipped with a note when /tmp/litgpt-venv is absent, or pass --no-litgpt):

    python3 -m venv /tmp/litgpt-venv
    /tmp/litgpt-venv/bin/pip install torch==2.13.0   # FIRST: the CPU wheel; an unpinned torch pulls CUDA
    /tmp/litgpt-venv/bin/pip install litgpt requests   # requests: litgpt 0.5.13's checkpoint save needs it
                                                        # (only declared in its [extra]); without it the run
                                                        # ends "ImportError: requests package is required"
    .venv/bin/python benchmarks/bench_train.py --litgpt-python /tmp/litgpt-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_LITGPT_PYTHON = Path("/tmp/litgpt-venv/bin/python")

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "LLMOPS_PROGRESS": "0",  # no tqdm on either side: a progress bar to a pipe is noise, not work
    "TOKENIZERS_PARALLELISM": "false",
}


# --------------------------------------------------------------------------------------------- shared


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def run_shape(params: dict, steps: int) -> dict:
    """The numbers every side trains with, read from params.yaml (defaults where a key is absent)."""
    pre, train = params["pretrain"], params.get("train", {})
    return {
        "steps": steps,
        "batch_size": int(pre["batch_size"]),
        "seq_len": int(pre["seq_len"]),
        "lr": float(pre["lr"]),
        "min_lr_ratio": float(pre.get("min_lr_ratio", 0.1)),
        "warmup_steps": int(pre.get("warmup_steps", 10)),
        "weight_decay": float(pre.get("weight_decay", 0.1)),
        "max_grad_norm": float(pre.get("max_grad_norm", 1.0)),
        "seed": int(train.get("seed", 0)),
        "log_every": int(train.get("log_every", 1)),
        "save_every": int(train.get("save_every", 25)),
        "eval_batches": max(1, -(-max(1, int(pre.get("eval_tokens", 50000)) // int(pre["seq_len"])) // int(pre["batch_size"]))),
        "preset_name": pre["preset"],
        "preset": dict(pre["presets"][pre["preset"]]),
    }


def load_avg() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------------------------- ours


class Timers:
    """Accumulated wall seconds and call counts of wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, owner: object, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        setattr(owner, attr, timed)

    def wrap_context(self, owner: object, attr: str, enter_name: str, exit_name: str) -> None:
        """Time a context manager's entry and exit separately (MLflow run start / end)."""
        from contextlib import contextmanager

        original = getattr(owner, attr)

        @contextmanager
        def timed(*args, **kwargs):
            start = time.perf_counter()
            cm = original(*args, **kwargs)
            value = cm.__enter__()
            self.add(enter_name, time.perf_counter() - start)
            try:
                yield value
            except BaseException:
                if not cm.__exit__(*sys.exc_info()):
                    raise
            else:
                start = time.perf_counter()
                cm.__exit__(None, None, None)
                self.add(exit_name, time.perf_counter() - start)

        setattr(owner, attr, timed)


def child_ours(shape: dict, workdir: Path) -> dict:
    # Libraries the stage imports lazily, imported before the clock starts (the brief: exclude imports).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import mlflow
    import mlflow.entities  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401

    sys.path.insert(0, str(ROOT))
    from tasks import pretrain
    from llmops.common import tracking
    from llmops.common.runner import run_stage
    from llmops.params.load import load_params
    from llmops.training import runtime

    project = workdir / "project"
    (project / "data").mkdir(parents=True)
    (project / "models").mkdir()
    (project / "data" / "tokens").symlink_to(ROOT / "data" / "tokens")
    (project / "models" / "tokenizer").symlink_to(ROOT / "models" / "tokenizer")
    params = repo_params()
    params["pretrain"]["token_budget"] = shape["steps"] * shape["batch_size"] * shape["seq_len"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.chdir(project)
    # Creating a sqlite store runs MLflow's schema migrations (seconds); the repo's store already exists, so
    # the store is created before the clock starts and its cost reported apart, not as per-run overhead.
    start = time.perf_counter()
    mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_experiments()
    store_create_s = time.perf_counter() - start

    timers = Timers()
    timers.wrap(transformers.Trainer, "train", "trainer.train")
    timers.wrap(transformers.Trainer, "_save_checkpoint", "checkpoint saves (in train)")
    timers.wrap(transformers.Trainer, "evaluate", "eval")
    timers.wrap(transformers.Trainer, "__init__", "Trainer()")
    timers.wrap(runtime, "save_final", "final save")
    timers.wrap(runtime, "plot_loss_curve", "loss curve")
    timers.wrap(runtime, "cleanup_checkpoints", "checkpoint cleanup")
    # The stage module imports its digests by name (`from llmops.common.fingerprints import ...`): wrapped where it looks them up.
    timers.wrap(pretrain, "file_sha256", "token manifest sha256")
    timers.wrap(pretrain, "directory_digest", "tokenizer sha256")
    timers.wrap(tracking, "log_result", "mlflow artifacts+metrics")
    timers.wrap_context(tracking, "stage_run", "mlflow run start (params, inputs)", "mlflow run end")
    # The per-step callback: on_log is where the MLflow metrics are queued (log_batch, synchronous=False).
    make_callback = runtime._callback_class

    def timed_callback_class():
        cls = make_callback()
        timers.wrap(cls, "on_log", "callback on_log (in train)")
        timers.wrap(cls, "flush", "mlflow async flush")
        return cls

    runtime._callback_class = timed_callback_class

    loaded = load_params(project / "params.yaml")
    start = time.perf_counter()
    result = run_stage("pretrain", loaded, track=True, params_file=project / "params.yaml")
    total = time.perf_counter() - start
    metrics = result.metrics
    tokens = int(metrics["steps"]) * shape["batch_size"] * shape["seq_len"]
    return {
        "side": "ours",
        "steps": int(metrics["steps"]),
        "tokens": tokens,
        "seconds": total,
        "tokens_per_s": tokens / total,
        "train_seconds": float(metrics["train_seconds"]),
        "train_tokens_per_s": tokens / float(metrics["train_seconds"]),
        "stage_tokens_per_s": float(metrics["tokens_per_s"]),
        "train_loss": float(metrics["train_loss"]),
        "val_loss": float(metrics["val_loss"]),
        "parts_s": timers.seconds,
        "part_calls": timers.calls,
        "mlflow_version": mlflow.__version__,
        "mlflow_store_create_s_excluded": store_create_s,
    }


# --------------------------------------------------------------------------------------------- bare


def child_bare(shape: dict, workdir: Path) -> dict:
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    from llmops.data.token_shards import TokenShards

    tokens_dir = ROOT / "data" / "tokens"
    meta = json.loads((tokens_dir / "meta.json").read_text())
    tok_cfg = json.loads((ROOT / "models" / "tokenizer" / "tokenizer.json").read_text())
    pad_id = next((t["id"] for t in tok_cfg.get("added_tokens", []) if t["content"] == "<|pad|>"), None)
    seq_len = shape["seq_len"]

    class Blocks(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.tokens = TokenShards(tokens_dir, "train")
            self.order = np.random.default_rng(shape["seed"]).permutation(len(self.tokens) // seq_len)

        def __len__(self) -> int:
            return len(self.order)

        def __getitem__(self, i: int) -> dict:
            start = int(self.order[i]) * seq_len
            ids = torch.from_numpy(self.tokens[start : start + seq_len].astype(np.int64))
            return {"input_ids": ids, "labels": ids.clone()}

    fields = dict(shape["preset"])
    model_type = fields.pop("model_type", "llama")
    fields["max_position_embeddings"] = max(int(fields.get("max_position_embeddings", seq_len)), seq_len)
    set_seed(shape["seed"])
    config = AutoConfig.for_model(
        model_type, vocab_size=meta["vocab_size"], bos_token_id=meta["eos_token_id"], eos_token_id=meta["eos_token_id"], pad_token_id=pad_id, **fields
    )
    model = AutoModelForCausalLM.from_config(config)
    args = TrainingArguments(
        output_dir=str(workdir / "bare"),
        report_to="none",
        save_strategy="no",
        logging_steps=shape["log_every"],
        max_steps=shape["steps"],
        per_device_train_batch_size=shape["batch_size"],
        learning_rate=shape["lr"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": shape["min_lr_ratio"]},
        warmup_steps=shape["warmup_steps"],
        weight_decay=shape["weight_decay"],
        max_grad_norm=shape["max_grad_norm"],
        adam_beta2=0.95,
        train_sampling_strategy="sequential",  # same block order as ours, so the losses can be compared
        seed=shape["seed"],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tail = losses[-max(1, len(losses) // 10) :]
    tokens = trainer.state.global_step * shape["batch_size"] * seq_len
    return {
        "side": "bare",
        "steps": trainer.state.global_step,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "train_loss": sum(tail) / len(tail),
    }


# --------------------------------------------------------------------------------------------- litgpt

# Runs under the litgpt venv's python (argv: shape json, workdir, repo root). litgpt's pretrain recipe
# wants a DataModule; this one serves the same seeded seq_len blocks of the train split (litgpt shifts
# input/target itself, so a block is seq_len + 1 tokens) instead of litdata's streaming dataset.
LITGPT_CHILD = textwrap.dedent(
    r'''
    import json, os, sys, time
    from dataclasses import dataclass, field
    from pathlib import Path

    import numpy as np
    import torch
    import lightning as L  # noqa: F401
    import litgpt
    import litgpt.pretrain as pretrain_mod
    from litgpt.args import EvalArgs, LogArgs, TrainArgs
    from litgpt.config import Config
    from litgpt.data import DataModule

    shape, workdir, root = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    sys.path.insert(0, str(root))  # the token shard reader: numpy and the standard library only
    from llmops.data.token_shards import TokenShards
    # litgpt's checkpoint save re-parses sys.argv as its CLI's (save_hyperparameters): give it a CLI-like line.
    sys.argv = [sys.argv[0], "bench-tiny"]
    meta = json.loads((root / "data/tokens/meta.json").read_text())
    seq_len, batch = shape["seq_len"], shape["batch_size"]

    class Blocks(torch.utils.data.Dataset):
        def __init__(self, split, seed):
            self.tokens = TokenShards(root / "data/tokens", split)
            n = (len(self.tokens) - 1) // seq_len
            self.order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)

        def __len__(self):
            return len(self.order)

        def __getitem__(self, i):
            start = int(self.order[i]) * seq_len
            return torch.from_numpy(self.tokens[start : start + seq_len + 1].astype(np.int64))

    @dataclass
    class MemmapBlocks(DataModule):
        seed: int = 0
        batch_size: int = 1
        seq_length: int = 2048

        def connect(self, tokenizer=None, batch_size=1, max_seq_length=None):
            self.batch_size = batch_size
            self.seq_length = max_seq_length

        def train_dataloader(self):
            return torch.utils.data.DataLoader(Blocks("train", self.seed), batch_size=self.batch_size, shuffle=False, num_workers=0)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(Blocks("val", None), batch_size=self.batch_size, shuffle=False, num_workers=0)

    p = shape["preset"]
    config = Config(
        name="bench-tiny",
        block_size=seq_len,
        vocab_size=meta["vocab_size"],
        padded_vocab_size=meta["vocab_size"],
        n_layer=p["num_hidden_layers"],
        n_head=p["num_attention_heads"],
        n_query_groups=p.get("num_key_value_heads", p["num_attention_heads"]),
        n_embd=p["hidden_size"],
        intermediate_size=p["intermediate_size"],
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=1e-6,
        mlp_class_name="LLaMAMLP",
        rope_base=10000,
    )
    tokens_per_step = batch * seq_len
    out_dir = workdir / "litgpt-out"
    start = time.perf_counter()
    pretrain_mod.setup(
        model_name=None,
        model_config=config,
        out_dir=out_dir,
        precision="32-true",
        resume=False,
        data=MemmapBlocks(seed=shape["seed"]),
        train=TrainArgs(
            save_interval=None,
            log_interval=shape["log_every"],
            global_batch_size=batch,
            micro_batch_size=batch,
            max_tokens=shape["steps"] * tokens_per_step,
            max_seq_length=seq_len,
            tie_embeddings=bool(p.get("tie_word_embeddings", False)),
            max_norm=shape["max_grad_norm"],
            min_lr=shape["lr"] * shape["min_lr_ratio"],
            lr_warmup_steps=shape["warmup_steps"],
        ),
        # One final eval over as many batches as ours scores (pretrain.eval_tokens), none in between.
        eval=EvalArgs(interval=10**9, max_iters=shape["eval_batches"], initial_validation=False, final_validation=True),
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": shape["lr"], "weight_decay": shape["weight_decay"], "betas": [0.9, 0.95]}},
        devices=1,
        num_nodes=1,
        tokenizer_dir=None,
        logger_name="csv",
        seed=shape["seed"],
    )
    seconds = time.perf_counter() - start
    import csv
    from importlib.metadata import version

    rows = [r for path in sorted(out_dir.rglob("metrics.csv")) for r in csv.DictReader(path.open())]
    def column(name):
        return [float(r[name]) for r in rows if r.get(name) not in (None, "")]
    losses, steps = column("loss"), column("step")
    n_steps = int(max(steps)) if steps else shape["steps"]
    tail = losses[-max(1, len(losses) // 10):] or [float("nan")]
    tokens = n_steps * tokens_per_step
    print("LITGPT_RESULT " + json.dumps({
        "side": "litgpt", "steps": n_steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "train_loss": sum(tail) / len(tail), "litgpt_version": version("litgpt"), "torch_compile": True,
    }))
    '''
)


def run_litgpt(python: Path, shape: dict, workdir: Path) -> dict:
    script = workdir / "litgpt_child.py"
    script.write_text(LITGPT_CHILD)
    out = subprocess.run(
        [str(python), str(script), json.dumps(shape), str(workdir), str(ROOT)],
        cwd=workdir, env=os.environ | OFFLINE_ENV, capture_output=True, text=True,
    )
    for line in out.stdout.splitlines():
        if line.startswith("LITGPT_RESULT "):
            result = json.loads(line[len("LITGPT_RESULT ") :])
            # litgpt prints each step's wall time: their sum is its pure step time (compile is in the first one).
            step_ms = [float(m) for m in re.findall(r"iter time: ([0-9.]+) ms", out.stdout)]
            result["step_seconds_sum"] = sum(step_ms) / 1000
            result["first_step_seconds"] = step_ms[0] / 1000 if step_ms else None
            result["step_tokens_per_s"] = result["tokens"] / result["step_seconds_sum"] if step_ms else None
            return result
    tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-25:])
    return {"side": "litgpt", "error": f"exit {out.returncode}", "log_tail": tail}


# --------------------------------------------------------------------------------------------- driver


def measure(side: str, shape: dict, litgpt_python: Path | None, profile: bool = False) -> dict:
    """One measurement in a fresh child process (same start state for every repeat and side)."""
    load_before = load_avg()
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{side}-") as tmp:
        workdir = Path(tmp)
        if side == "litgpt":
            result = run_litgpt(litgpt_python, shape, workdir)
        else:
            result_file = workdir / "result.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--shape", json.dumps(shape), "--workdir", str(workdir), "--result", str(result_file)]
            if profile:
                cmd.append("--child-profile")
            out = subprocess.run(cmd, cwd=ROOT, env=os.environ | OFFLINE_ENV, capture_output=True, text=True)
            if out.returncode != 0 or not result_file.exists():
                tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-40:])
                raise SystemExit(f"{side} child failed (exit {out.returncode}):\n{tail}")
            result = json.loads(result_file.read_text())
    result["load_avg_1m_before"] = load_before
    return result


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}" if values else "-"


def summarize(runs: list[dict], shape: dict) -> dict:
    def ok(side: str) -> list[dict]:
        return [r for r in runs if r["side"] == side and "error" not in r]

    ours, bare, lit = ok("ours"), ok("bare"), ok("litgpt")
    summary: dict = {}
    if ours and bare:
        bare_tps = statistics.median(r["tokens_per_s"] for r in bare)
        bare_s = statistics.median(r["seconds"] for r in bare)
        ours_tps = statistics.median(r["tokens_per_s"] for r in ours)
        ours_train_tps = statistics.median(r["train_tokens_per_s"] for r in ours)
        ours_s = statistics.median(r["seconds"] for r in ours)
        ours_train_s = statistics.median(r["train_seconds"] for r in ours)
        for r in ours:
            top_level = sum(v for k, v in r["parts_s"].items() if "(in train)" not in k)
            r["parts_s"]["rest (model build, tokenizer load, lazy transformers imports, metrics json)"] = r["seconds"] - top_level
            # What the stage adds besides training and the held-out eval (which is work, not overhead).
            r["extras_excl_eval_s"] = r["seconds"] - r["train_seconds"] - r["parts_s"].get("eval", 0.0)
            r["in_loop_extras_s"] = sum(v for k, v in r["parts_s"].items() if "(in train)" in k)
        parts = sorted({k for r in ours for k in r["parts_s"]})
        part_medians = {k: statistics.median(r["parts_s"].get(k, 0.0) for r in ours) for k in parts}
        extras_pct = [100 * r["extras_excl_eval_s"] / r["train_seconds"] for r in ours]
        in_loop_pct = [100 * r["in_loop_extras_s"] / r["train_seconds"] for r in ours]
        eval_pct = [100 * r["parts_s"].get("eval", 0.0) / r["train_seconds"] for r in ours]
        summary = {
            "bare_tokens_per_s": bare_tps,
            "ours_stage_tokens_per_s": ours_tps,
            "ours_train_tokens_per_s": ours_train_tps,
            "ratio_stage_vs_bare": ours_tps / bare_tps,
            "ratio_train_vs_bare": ours_train_tps / bare_tps,
            # Overhead as extra wall time relative to the bare training time.
            "overhead_stage_pct": 100 * (bare_tps / ours_tps - 1),
            "overhead_train_loop_pct": 100 * (bare_tps / ours_train_tps - 1),
            "bare_seconds": bare_s,
            "ours_seconds": ours_s,
            "ours_train_seconds": ours_train_s,
            "ours_part_seconds_median": part_medians,
            "target_overhead_pct": 5.0,
            # Attributed from the timers inside each ours run (noise-free by construction, unlike ours-vs-bare wall).
            "extras_excl_eval_pct_of_train_median": statistics.median(extras_pct),
            "in_loop_extras_pct_of_train_median": statistics.median(in_loop_pct),
            "eval_pct_of_train_median": statistics.median(eval_pct),
            "mlflow_store_create_s_excluded_median": statistics.median(r.get("mlflow_store_create_s_excluded", 0.0) for r in ours),
        }
        summary["target_met_stage"] = summary["overhead_stage_pct"] < 5.0
        summary["target_met_train_loop"] = summary["overhead_train_loop_pct"] < 5.0
        summary["target_met_attributed"] = summary["extras_excl_eval_pct_of_train_median"] < 5.0
        # Paired ratios (each ours run against the bare run right after it): a noise check on the medians.
        pairs = [o["tokens_per_s"] / b["tokens_per_s"] for o, b in zip(ours, bare, strict=False)]
        summary["paired_stage_ratios"] = pairs
    if lit:
        summary["litgpt_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in lit)
        steps_only = [r["tokens"] / r["step_seconds_sum"] for r in lit if r.get("step_seconds_sum")]
        if steps_only:
            summary["litgpt_step_tokens_per_s"] = statistics.median(steps_only)
        if bare:
            summary["ratio_litgpt_vs_bare"] = summary["litgpt_tokens_per_s"] / summary.get("bare_tokens_per_s", statistics.median(r["tokens_per_s"] for r in bare))
    return summary


def markdown(runs: list[dict], summary: dict, shape: dict, litgpt_note: str | None) -> str:
    tokens = shape["steps"] * shape["batch_size"] * shape["seq_len"]
    lines = [
        f"pretrain preset `{shape['preset_name']}`, {shape['steps']} steps x batch {shape['batch_size']} x seq_len {shape['seq_len']} = {tokens:,} tokens per run; "
        f"save_every {shape['save_every']}, log_every {shape['log_every']}; torch threads {_threads()}; {len([r for r in runs if r['side'] == 'ours'])} interleaved repeats",
        "",
        "| side | what is timed | median tokens/s | spread (min-max) | median s | ratio vs bare | final train loss |",
        "|---|---|---:|---|---:|---:|---:|",
    ]

    def side_rows(side: str, key: str, what: str, seconds_key: str) -> None:
        rs = [r for r in runs if r["side"] == side and "error" not in r]
        if not rs:
            return
        tps = [r[key] for r in rs]
        med = statistics.median(tps)
        ratio = med / summary["bare_tokens_per_s"] if "bare_tokens_per_s" in summary else float("nan")
        loss = statistics.median(r["train_loss"] for r in rs)
        secs = statistics.median(r[seconds_key] for r in rs)
        lines.append(f"| {side} | {what} | {med:,.0f} | {spread(tps)} | {secs:.1f} | {ratio:.3f} | {loss:.3f} |")

    side_rows("bare", "tokens_per_s", "`trainer.train()`", "seconds")
    side_rows("ours", "train_tokens_per_s", "stage's `train_seconds` (Trainer.train)", "train_seconds")
    side_rows("ours", "tokens_per_s", "whole `run_stage(\"pretrain\")`", "seconds")
    side_rows("litgpt", "tokens_per_s", "`litgpt.pretrain.setup()`", "seconds")
    side_rows("litgpt", "step_tokens_per_s", "litgpt's printed step times, summed (compile in step 1)", "step_seconds_sum")
    if "overhead_stage_pct" in summary:
        lines += [
            "",
            f"Wall-clock overhead vs bare (extra time / bare time; includes machine noise, see the spread): "
            f"training loop {summary['overhead_train_loop_pct']:+.1f}%, whole stage {summary['overhead_stage_pct']:+.1f}%. "
            f"Paired ours/bare ratios per repeat: {', '.join(f'{x:.3f}' for x in summary['paired_stage_ratios'])}.",
            "",
            f"Attributed overhead (timers inside each ours run, median % of its own train time): in-loop extras "
            f"(callback, checkpoint saves) {summary['in_loop_extras_pct_of_train_median']:.1f}%; everything the stage does besides "
            f"Trainer.train and the eval {summary['extras_excl_eval_pct_of_train_median']:.1f}%; the held-out eval "
            f"{summary['eval_pct_of_train_median']:.1f}%. Target < 5% (excluding the eval): "
            f"{'MET' if summary['target_met_attributed'] else 'NOT met'}. A fresh sqlite MLflow store costs "
            f"{summary['mlflow_store_create_s_excluded_median']:.1f} s once (made before the clock; excluded).",
            "",
            "Where the stage's time goes (median per part over repeats, so rows need not sum exactly; \"in train\" rows are inside Trainer.train):",
            "",
            "| part | median s | % of median stage |",
            "|---|---:|---:|",
        ]
        total = summary["ours_seconds"]
        for name, secs in sorted(summary["ours_part_seconds_median"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {secs:.2f} | {100 * secs / total:.1f}% |")
        lines.append(f"| **whole stage** | {total:.2f} | 100% |")
    if litgpt_note:
        lines += ["", f"litgpt: {litgpt_note}"]
    return "\n".join(lines)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def child_main(args: argparse.Namespace) -> None:
    shape = json.loads(args.shape)
    workdir = Path(args.workdir)
    fn = child_ours if args.child == "ours" else child_bare
    if args.child_profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(fn, shape, workdir)
        for sort in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(sort).print_stats(45)
            result[f"profile_{sort}"] = buf.getvalue()
    else:
        result = fn(shape, workdir)
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per side")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (pretrain.token_budget = steps x batch x seq_len)")
    parser.add_argument("--litgpt-python", type=Path, default=DEFAULT_LITGPT_PYTHON, help="python of a venv with litgpt installed")
    parser.add_argument("--no-litgpt", action="store_true", help="skip the litgpt peer")
    parser.add_argument("--profile", action="store_true", help="after the repeats, one cProfile'd run of ours (top functions printed)")
    parser.add_argument("--output", type=Path, default=RESULTS / "bench_train.json")
    parser.add_argument("--child", choices=["ours", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    shape = run_shape(repo_params(), args.steps)
    litgpt_python: Path | None = None
    litgpt_note: str | None = None
    if args.no_litgpt:
        litgpt_note = "skipped (--no-litgpt)"
    elif not args.litgpt_python.exists():
        litgpt_note = f"skipped: {args.litgpt_python} not found (see the peer setup in this file's docstring)"
    else:
        litgpt_python = args.litgpt_python
    sides = ["ours", "bare"] + (["litgpt"] if litgpt_python else [])
    runs: list[dict] = []
    started = time.time()
    for repeat in range(args.repeats):
        for side in sides:
            result = measure(side, shape, litgpt_python)
            result["repeat"] = repeat
            runs.append(result)
            if "error" in result:
                print(f"[{repeat}] {side}: FAILED {result['error']}\n{result['log_tail']}", flush=True)
                if side == "litgpt":
                    litgpt_note = f"failed ({result['error']}):\n\n```\n{result['log_tail']}\n```"
                    sides.remove("litgpt")
                continue
            print(f"[{repeat}] {side}: {result['tokens_per_s']:,.0f} tokens/s ({result['seconds']:.1f} s, load {result['load_avg_1m_before']:.1f})", flush=True)
    profile = None
    if args.profile:
        profiled = measure("ours", shape, None, profile=True)
        profile = {k: profiled.pop(k) for k in ("profile_cumulative", "profile_tottime")}
        profile["run"] = profiled
    summary = summarize(runs, shape)
    lit_ok = [r for r in runs if r["side"] == "litgpt" and "error" not in r]
    if lit_ok:
        litgpt_note = f"version {lit_ok[0].get('litgpt_version')}; its tokens/s is in the table (wall of its whole pretrain recipe, incl. its final checkpoint save)"
    table = markdown(runs, summary, shape, litgpt_note)
    print()
    print(table)
    if profile:
        print("\ncProfile of one ours run (cumulative):\n")
        print(profile["profile_cumulative"])
        print("\ncProfile of one ours run (tottime):\n")
        print(profile["profile_tottime"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_train",
        "command": " ".join([".venv/bin/python", "benchmarks/bench_train.py", *sys.argv[1:]]),
        "shape": shape,
        "summary": summary,
        "runs": runs,
        "litgpt_note": litgpt_note,
        "profile": profile,
        "table_markdown": table,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": _threads()},
        "wall_s": time.time() - started,
    }
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    main()
