"""Serving throughput and latency on CPU: `transformers serve` with continuous batching behind our proxy, vs a naive loop.

Baseline: one request at a time, `model.generate` in this process (greedy, the same prompts, the same
max new tokens), the way a hand-written server without batching answers. Served: the project's real path
(`llmops.serving.server.serving`: transformers serve --continuous-batching on a private port, the API-key
proxy on the public one) driven by `llmops.serving.probes.load_test` (AsyncOpenAI, streamed completions)
at 1, 4 and 16 concurrent clients. Every row sends the same `--requests` prompts.

The model: `--model DIR` (e.g. models/finetune), else the `tiny` preset of params.yaml (the CPU default,
~3M parameters) with random weights and a 2,048-token BPE trained on stdlib code, saved in a temp directory.
Random weights do not change the cost per token; greedy decoding of a random model rarely stops early,
and both sides count the tokens they actually generated.

    .venv/bin/python benchmarks/bench_serve.py [--requests 64] [--max-tokens 32] [--clients 1 4 16] [--model DIR]

Prints a markdown table and writes benchmarks/results/serve.json (gitignored).
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

import numpy as np  # noqa: E402

from llmops.params.load import load_params  # noqa: E402
from llmops.serving.probes import LOAD_PROMPTS, summarize  # noqa: E402


def tiny_model(out: Path) -> Path:
    """The params.yaml `tiny` preset with random weights and a small BPE (with the code chat template), via save_pretrained."""
    import torch

    from llmops.params.tokenize import TokenizeConfig
    from llmops.data.sources import stdlib_root
    from llmops.data.tokenizer import train_bpe
    from llmops.training.instructions import TEMPLATES
    from llmops.training.model import build_config, build_model

    params = load_params(ROOT / "params.yaml")
    texts = [p.read_text() for p in sorted((stdlib_root() / "json").glob("*.py")) + sorted((stdlib_root() / "email").glob("*.py"))]
    tokenizer = train_bpe(texts, TokenizeConfig(vocab_size=2048))
    tokenizer.chat_template = TEMPLATES["code"]
    pretrain = params.pretrain.model_copy(update={"preset": "tiny"})
    config = build_config(pretrain, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    build_model(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def naive_loop(model_dir: Path, prompts: list[str], max_tokens: int) -> dict:
    """One request at a time: tokenize, generate (greedy), decode; latency per request, tokens actually generated."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops.serving.probes import RequestResult

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():  # warm-up, not timed (the server gets its first requests before timing too)
        model.generate(**tokenizer(prompts[0], return_tensors="pt"), max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    results = []
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            t0 = time.perf_counter()
            inputs = tokenizer(prompt, return_tensors="pt")
            output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            latency = time.perf_counter() - t0
            results.append(RequestResult(True, latency, 0.0, int(output.shape[1] - inputs["input_ids"].shape[1])))
    return summarize(results, time.perf_counter() - start, clients=1)


def served(model_dir: Path, clients_list: list[int], requests: int, max_tokens: int, workdir: Path) -> list[dict]:
    from llmops.serving.backends import inspect_model
    from llmops.serving.probes import load_test
    from llmops.serving.server import serving

    cfg = load_params(ROOT / "params.yaml").serve.model_copy(update={"health_timeout_s": 300, "request_timeout_s": 600})
    key = "bench-" + os.urandom(8).hex()
    rows = []
    with serving(inspect_model(model_dir, "bench"), cfg, "transformers", key, port=0, log_dir=workdir / "logs") as server:
        load_test(server.openai_base_url, key, "bench", clients=4, requests=8, max_tokens=4, timeout_s=600)  # warm-up
        for clients in clients_list:
            rows.append(load_test(server.openai_base_url, key, "bench", clients=clients, requests=requests, max_tokens=max_tokens, timeout_s=600))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        model_dir = args.model.resolve() if args.model else tiny_model(workdir / "tiny")
        prompts = [LOAD_PROMPTS[i % len(LOAD_PROMPTS)] for i in range(args.requests)]
        print(f"model {model_dir if args.model else 'tiny preset (random weights)'}; {args.requests} requests x {args.max_tokens} tokens; {os.cpu_count()} CPU cores", flush=True)
        baseline = naive_loop(model_dir, prompts, args.max_tokens)
        print(f"naive generate loop: {baseline['tokens_per_s']:.1f} tokens/s", flush=True)
        rows = served(model_dir, args.clients, args.requests, args.max_tokens, workdir)

    print()
    print("| mode | clients | requests | errors | tokens | wall s | tokens/s | req/s | p50 s | p95 s | TTFT p50 s | tokens/s vs naive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in [("naive generate loop", baseline)] + [("transformers serve + proxy", r) for r in rows]:
        ttft = "-" if np.isnan(row["ttft_p50_s"]) else f"{row['ttft_p50_s']:.3f}"
        print(
            f"| {name} | {row['clients']} | {row['requests']} | {row['errors']} | {row['completion_tokens']} | {row['wall_s']:.1f} | {row['tokens_per_s']:.1f} | "
            f"{row['requests_per_s']:.2f} | {row['latency_p50_s']:.3f} | {row['latency_p95_s']:.3f} | {ttft} | {row['tokens_per_s'] / baseline['tokens_per_s']:.2f}x |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"machine": platform.platform(), "cpus": os.cpu_count(), "requests": args.requests, "max_tokens": args.max_tokens, "naive": baseline, "served": rows}
    (RESULTS / "serve.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwritten {RESULTS / 'serve.json'}")


if __name__ == "__main__":
    main()
