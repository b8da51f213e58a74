"""Speculative decoding on CPU: the same model greedy with and without its distilled draft, on HumanEval prompts, in one
run: acceptance rate of the drafted tokens, tokens per target forward pass, tokens/s and the speed-up, per number of
drafted tokens per round, and whether every output is identical to the model's alone (it must be: greedy assisted
generation is lossless).

The target is `--target` (default: models/finetune of the checkout) and the draft `--draft` (default models/student,
what the distill stage writes). The two modes alternate per prompt, so machine load hits both alike; the acceptance
counter wraps transformers' own verification (llmops/serving/speculative.py). The distill stage records the same
measurement for distill.num_speculative_tokens in metrics/distill.json (`speculative`).

    .venv/bin/python benchmarks/bench_speculative.py [--target DIR] [--draft DIR] [--prompts 20] [--new-tokens 64]
        [--speculative-tokens 2,4,6] [--threads 0]

Prints a markdown table and writes benchmarks/results/speculative.json (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from _setup import RESULTS, ROOT  # noqa: E402  (repo on sys.path, offline environment, no progress bars)

PROMPT_TOKENS = 64  # the end of each HumanEval prompt (the signature and docstring being completed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=ROOT / "models/finetune")
    parser.add_argument("--draft", type=Path, default=ROOT / "models/student")
    parser.add_argument("--prompts", type=int, default=20, help="HumanEval prompts, in order")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (stops early at EOS)")
    parser.add_argument("--speculative-tokens", default="2,4,6", help="drafted tokens per round, one row each")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    args = parser.parse_args()

    import torch

    from llmops.evaluation.generation import load_model
    from llmops.serving.speculative import compare, humaneval_prompt_ids, load_draft

    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (args.target, args.draft):
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path}: no model (config.json missing); run `llmops run` (or the finetune and distill stages) first")
    target, tokenizer = load_model(args.target)
    prompts = humaneval_prompt_ids(tokenizer, args.prompts, PROMPT_TOKENS)
    rows = []
    for n in (int(x) for x in args.speculative_tokens.split(",")):
        draft = load_draft(args.draft, n, dtype="float32")
        run = compare(target, draft, prompts, args.new_tokens, eos_token_id=tokenizer.eos_token_id)
        rows.append({"num_speculative_tokens": n, **run.metrics()})
        print(f"n={n}: acceptance {rows[-1]['acceptance_rate']:.3f}, speed-up {rows[-1]['speedup']:.2f}x", flush=True)

    print(f"\ntarget {args.target} ({target.config.num_hidden_layers} layers), draft {args.draft}; {len(prompts)} HumanEval prompts "
          f"(last {PROMPT_TOKENS} tokens), greedy, up to {args.new_tokens} new tokens, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n")
    print("| drafted/round | acceptance | tokens/target pass | tokens/s alone | tokens/s with draft | speed-up | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_speculative_tokens']} | {r['acceptance_rate']:.3f} | {r['tokens_per_round']:.2f} | {r['baseline_tokens_per_s']:.1f} | "
              f"{r['speculative_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['identical_outputs']}/{r['prompts']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "speculative.json"
    out.write_text(json.dumps({"target": str(args.target), "draft": str(args.draft), "threads": torch.get_num_threads(),
                               "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
