"""The quantization table of the default tiny model: precision loss, size, load memory and CPU latency of each
scheme against the unquantized model, all measured in this run.

1. The model. With `--project DIR` (a checkout after `make run`: models/finetune, data/tokens, params.yaml), that
   model. Otherwise a temp project: a few stdlib packages as the corpus, the default tokenizer settings (8192-token
   BPE), and the default `tiny` preset pretrained for `--token-budget` tokens (the pretrained model stands in for the
   fine-tuned one; quantize reads whatever `paths.finetune_model` holds). Every other knob is params.yaml's default.
2. The quantize stage itself (`tasks.quantize.run(params.quantize, params.evaluate, params.paths)`, its library in
   llmops/quantization/; default `quantize` params, evaluate's perplexity settings, HumanEval on `--problems`
   problems): its table, ratios against the unquantized row of the same run.
3. Latency again, interleaved: `--rounds` rounds, each measuring every model once in a fresh process, so machine
   load drifts over all models alike; the median per model gives the speed-up column printed last.

    .venv/bin/python benchmarks/bench_quantize.py [--project DIR] [--token-budget 200000] [--problems 20] [--rounds 3]

Prints markdown tables and writes benchmarks/results/quantize.json (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from _setup import RESULTS, ROOT  # noqa: E402  (repo on sys.path, offline environment, no progress bars)

import yaml  # noqa: E402

from llmops.params.load import load_params  # noqa: E402

CORPUS_PACKAGES = ("json", "email", "http", "urllib", "importlib", "concurrent", "logging", "xml")


def tiny_project(workdir: Path, token_budget: int, problems: int) -> Path:
    """A temp project holding the default tiny model pretrained on a small stdlib corpus."""
    import pyarrow as pa

    from tasks import tokenize
    from llmops.common.io import RECORD_SCHEMA, write_records
    from llmops.data.sources import stdlib_root
    from llmops.common.runner import run_stage

    files = sorted(p for pkg in CORPUS_PACKAGES for p in (stdlib_root() / pkg).rglob("*.py"))
    rows = [{"id": str(p.relative_to(stdlib_root())), "text": p.read_text(errors="replace"), "source": "stdlib", "meta": "{}", "ingest_error": None} for p in files]
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"]["finetune_model"] = raw["paths"]["pretrain_model"]
    raw["pretrain"]["token_budget"] = token_budget
    raw["evaluate"]["max_problems"] = problems
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    os.chdir(workdir)
    params = load_params(workdir / "params.yaml")  # params.paths.* resolved under workdir
    write_records(params.paths.dedup, pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), shard_max_bytes=16_000_000)
    started = time.perf_counter()
    tokenize.run(params.tokenize, params.model, params.paths)
    run_stage("pretrain", params, track=False)
    print(f"# built {workdir}: {len(files)} stdlib files, tiny preset pretrained on {token_budget:,} tokens "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return workdir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a checkout after `make run` (default: build a temp tiny project)")
    parser.add_argument("--token-budget", type=int, default=200_000, help="pretraining tokens of the temp project")
    parser.add_argument("--problems", type=int, default=20, help="HumanEval problems per model (temp project)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    args = parser.parse_args()

    import torch

    from tasks import quantize
    from llmops.quantization import measure
    from llmops.quantization.compress import latency_prompt
    from llmops.quantization.table import BASELINE

    tmp = tempfile.TemporaryDirectory(prefix="bench-quantize-")
    if args.project:
        os.chdir(args.project)
    else:
        tiny_project(Path(tmp.name), args.token_budget, args.problems)
    params = load_params(Path("params.yaml"))
    started = time.perf_counter()
    result = quantize.run(params.quantize, params.evaluate, params.paths)
    stage_s = time.perf_counter() - started
    report = params.paths.reports / "quantize" / quantize.TABLE_FILE
    print(f"\n## quantize stage ({stage_s:.0f} s wall, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__})\n")
    print(report.read_text())

    cfg = params.quantize
    models = {BASELINE: params.paths.finetune_model}
    models |= {s: params.paths.quantized / s for s in cfg.schemes if s in result.metrics}
    prompt = latency_prompt(params.paths.tokens, cfg)
    timings: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, path in models.items():
            timings[name].append(measure.measure_in_child(path, prompt, cfg.latency_new_tokens, cfg.latency_repeats).ms_per_token)
    base = statistics.median(timings[BASELINE])
    print(f"## CPU latency, {args.rounds} interleaved rounds x {cfg.latency_repeats} runs "
          f"({cfg.latency_prompt_tokens}-token prompt, {cfg.latency_new_tokens} new tokens, batch 1)\n")
    print("| model | ms/token (median) | per round | speed-up vs unquantized |\n|---|---|---|---|")
    for name, values in timings.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.2f} | {', '.join(f'{v:.1f}' for v in values)} | {base / med:.2f}x |")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"stage_seconds": stage_s, "metrics": result.metrics, "interleaved_ms_per_token": timings}
    (RESULTS / "quantize.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwritten {RESULTS / 'quantize.json'}")


if __name__ == "__main__":
    main()
