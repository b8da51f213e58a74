"""AWQ against GPTQ W4A16 and the unquantized model: held-out perplexity, size on disk and time of the quantize step
of each scheme, all measured in one run of the quantize stage.

1. The model: the micro project of the training tests (a 2-layer Llama of ~28k parameters pretrained for 40 steps on
   stdlib json + email, 300-token BPE), or with `--tiny` the default `tiny` preset pretrained on a small stdlib corpus
   for `--token-budget` tokens (benchmarks/bench_quantize.py's temp project), or `--project DIR` (a checkout after
   `make run`). The pretrained model stands in for the fine-tuned one.
2. The quantize stage (`tasks.quantize.run`) with `--schemes` (default w4a16 and awq), params.yaml's quantize settings
   otherwise (the micro project keeps the tests' 16 calibration blocks of 32 tokens), no HumanEval.

    .venv/bin/python benchmarks/bench_awq.py [--tiny [--token-budget 200000] | --project DIR] [--schemes w4a16,awq]

Prints a markdown table and writes benchmarks/results/awq.json (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _setup import RESULTS, ROOT  # noqa: E402  (repo on sys.path, offline environment, no progress bars)

import yaml  # noqa: E402

from llmops.params.load import load_params  # noqa: E402

MICRO = {  # tests/helpers.py's MICRO model, with the calibration and evaluation sizes of tests/training/test_quantize_awq.py
    "model": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "tie_word_embeddings": True, "max_position_embeddings": 256},
    "pretrain": {"seq_len": 32, "batch_size": 4, "token_budget": 4 * 32 * 40, "lr": 0.01, "warmup_steps": 2, "eval_tokens": 2048},
    "quantize": {"calibration_samples": 16, "calibration_seq_len": 32},
    "evaluate": {"seq_len": 32, "eval_tokens": 2048, "batch_size": 8},
}


def micro_project(workdir: Path) -> None:
    """The training tests' micro project: stdlib json + email tokenized with a 300-token BPE, the micro model pretrained."""
    import pyarrow as pa

    from tasks import tokenize
    from llmops.common.io import RECORD_SCHEMA, write_records
    from llmops.common.runner import run_stage
    from llmops.data.sources import stdlib_root

    files = sorted((stdlib_root() / "json").glob("*.py")) + sorted((stdlib_root() / "email").glob("*.py"))[:12]
    rows = [{"id": f"stdlib/{p.parent.name}/{p.name}", "text": p.read_text(), "source": "stdlib", "meta": "{}", "ingest_error": None} for p in files]
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"]["finetune_model"] = raw["paths"]["pretrain_model"]
    raw["tokenize"]["vocab_size"], raw["tokenize"]["val_fraction"] = 300, 0.1
    raw["train"]["device"] = "cpu"
    raw["pretrain"] |= {**MICRO["pretrain"], "preset": "micro", "presets": {"micro": MICRO["model"]}}
    raw["quantize"] |= MICRO["quantize"]
    raw["evaluate"] |= MICRO["evaluate"]
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    os.chdir(workdir)
    params = load_params(workdir / "params.yaml")
    write_records(params.paths.dedup, pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), shard_max_bytes=16_000_000)
    tokenize.run(params.tokenize, params.model, params.paths)
    run_stage("pretrain", params, track=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a checkout after `make run`")
    parser.add_argument("--tiny", action="store_true", help="the default tiny preset on a temp stdlib project")
    parser.add_argument("--token-budget", type=int, default=200_000, help="pretraining tokens of the --tiny project")
    parser.add_argument("--schemes", default="w4a16,awq", help="comma-separated quantize.schemes")
    args = parser.parse_args()

    import torch

    from tasks import quantize

    tmp = tempfile.TemporaryDirectory(prefix="bench-awq-")
    started = time.perf_counter()
    if args.project:
        os.chdir(args.project)
        model = str(args.project)
    elif args.tiny:
        from bench_quantize import tiny_project

        tiny_project(Path(tmp.name), args.token_budget, 0)
        model = f"tiny preset, {args.token_budget:,} pretraining tokens"
    else:
        micro_project(Path(tmp.name))
        model = "micro model of the training tests"
    build_s = time.perf_counter() - started
    params = load_params(Path("params.yaml"))
    cfg = params.quantize.model_copy(update={"schemes": args.schemes.split(","), "humaneval": False})
    started = time.perf_counter()
    result = quantize.run(cfg, params.evaluate, params.paths)
    stage_s = time.perf_counter() - started

    metrics = result.metrics
    rows = [name for name in metrics if isinstance(metrics[name], dict) and "perplexity" in metrics[name]]
    print(f"\n## {model} (built in {build_s:.0f} s); quantize stage {stage_s:.0f} s wall, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"calibration: {metrics['calibration']}\n")
    print("| scheme | perplexity | Δ perplexity | size MB | size ratio | quantize s | quantize s vs w4a16 |\n|---|---|---|---|---|---|---|")
    w4a16_s = metrics.get("w4a16", {}).get("quantize_seconds")
    for name in rows:
        row = metrics[name]
        seconds = row.get("quantize_seconds")
        print(f"| {name} | {row['perplexity']:.3f} | {row.get('perplexity_increase', 0):+.2%} | {row['size_mb']:.3f} | "
              f"{row.get('size_ratio', 1):.2f}x | {'' if seconds is None else f'{seconds:.1f}'} | "
              f"{'' if seconds is None or not w4a16_s else f'{seconds / w4a16_s:.2f}x'} |")

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "awq.json").write_text(json.dumps({"model": model, "stage_seconds": stage_s, "metrics": metrics}, indent=2, default=str))
    print(f"\nwritten {RESULTS / 'awq.json'}")


if __name__ == "__main__":
    main()
