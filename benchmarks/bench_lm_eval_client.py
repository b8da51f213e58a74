"""lm-eval's OpenAI-compatible client against the served endpoint vs lm-eval's in-process HF backend, same model.

Serves the model the project's way (`llmops.serving.server.serving`: transformers serve behind the API-key proxy,
CPU), runs `--tasks` (default llmops_humaneval) through `llmops.evaluation.lm_eval.score_endpoint`
(`local-completions`, the key as OPENAI_API_KEY) and through `score_model` (the HF backend in this process), and
prints each metric both ways with the difference, how many greedy completions are the same text, and the wall time
of each path. Greedy decoding of the same fp32 weights: the metrics should be equal and the completions identical.

The model: `--model DIR` (e.g. models/finetune), else the `tiny` preset with random weights (bench_serve.tiny_model).

    .venv/bin/python benchmarks/bench_lm_eval_client.py [--model DIR] [--tasks llmops_humaneval] [--limit 10] [--max-new-tokens 64] [--output PATH]

Writes benchmarks/results/lm_eval_client.json (gitignored), or --output.
"""

from __future__ import annotations

import argparse
import json
import secrets
import tempfile
import time
from pathlib import Path

from _setup import RESULTS, ROOT  # noqa: E402  (repo on sys.path, offline environment, no progress bars)

from bench_serve import tiny_model  # noqa: E402

from llmops.evaluation import lm_eval  # noqa: E402
from llmops.evaluation.scoring import truncate_at_stop  # noqa: E402
from llmops.params.load import load_params  # noqa: E402
from llmops.serving.backends import inspect_model  # noqa: E402
from llmops.serving.server import serving  # noqa: E402


def completions(results: dict, task: str) -> list[str]:
    return [truncate_at_stop(sample["resps"][0][0]) for sample in results["samples"].get(task, []) if sample["resps"] and isinstance(sample["resps"][0][0], str)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tasks", nargs="+", default=[lm_eval.HUMANEVAL_TASK])
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS / "lm_eval_client.json")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    cfg = params.evaluate.model_copy(update={"lm_eval_limit": args.limit, "max_new_tokens": args.max_new_tokens, "batch_size": 1})
    metadata = lm_eval.heldout_metadata(params.paths.tokens, params.paths.tokenizer, cfg.eval_tokens)
    with tempfile.TemporaryDirectory(prefix="bench-lm-eval-") as tmp:
        model_dir = args.model.resolve() if args.model else tiny_model(Path(tmp) / "tiny")
        key = secrets.token_urlsafe(16)
        with serving(inspect_model(model_dir, "bench"), params.serve.model_copy(update={"port": 0}), "transformers", key, log_dir=Path(tmp) / "logs", cwd=ROOT) as server:
            started = time.perf_counter()
            served = lm_eval.score_endpoint(server.url, key, model_dir, args.tasks, args.limit, model="bench", cfg=cfg, metadata=metadata)
            served_s = time.perf_counter() - started
        started = time.perf_counter()
        local = lm_eval.score_model(model_dir, args.tasks, cfg, metadata)
        local_s = time.perf_counter() - started

    rows = []
    served_metrics, local_metrics = lm_eval.task_metrics(served), lm_eval.task_metrics(local)
    print("| task | metric | endpoint (local-completions) | in-process (hf) | difference |\n|---|---|---|---|---|")
    for task, values in local_metrics.items():
        for metric, value in values.items():
            other = served_metrics.get(task, {}).get(metric, float("nan"))
            rows.append({"task": task, "metric": metric, "endpoint": other, "in_process": value, "difference": other - value})
            print(f"| {task} | {metric} | {other:.4f} | {value:.4f} | {other - value:+.4f} |")
    same = {task: sum(a == b for a, b in zip(completions(served, task), completions(local, task), strict=False)) for task in args.tasks}
    print(f"\nidentical greedy completions: {same} of {args.limit} per task; wall: endpoint {served_s:.1f} s, in-process {local_s:.1f} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": str(args.model or "tiny (random)"), "limit": args.limit, "max_new_tokens": args.max_new_tokens,
                                       "rows": rows, "identical_completions": same, "endpoint_s": served_s, "in_process_s": local_s}, indent=2))
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
