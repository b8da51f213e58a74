"""Serving throughput and latency: the proxy's cost in front of the same backend, and the backend vs a naive loop.

Served: the project's real path (`llmops.serving.server.serving`: transformers serve's app with continuous batching
on a private Unix socket, the API-key proxy on the public port), driven by `llmops.serving.probes.load_test`
(AsyncOpenAI, streamed completions) at 1, 4 and 16 concurrent clients, twice per round: once through the proxy,
once straight at the backend's socket (the same process, the same model id the proxy forwards to). Rounds
alternate the two, so noise from other work on the machine falls on both alike; each row is the median round.

Baseline: one request at a time, `model.generate` in this process (greedy, the same prompts, the same max new
tokens), the way a hand-written server without batching answers: its tokens/s is the same whatever the number
of clients, so each served row is compared with it. On CPU it runs with torch's default threads and, when it differs,
with the backend's serve.torch_threads, so the ratio shows what batching gains beyond the thread setting; with
`--device cuda` it runs once, in bf16 on the GPU.

`--backend vllm` serves with vLLM (`make vllm`) instead of transformers serve, on a GPU host; benchmarks/gpu_check.py
runs it that way (`--device cuda --naive-requests 16`: the naive loop's tokens/s does not depend on the client count,
so fewer requests measure it).

The model: `--model DIR` (e.g. models/finetune), else the `tiny` preset of params.yaml (the CPU default,
~3M parameters) with random weights and a 2,048-token BPE trained on stdlib code, saved in a temp directory.
Random weights do not change the cost per token; greedy decoding of a random model rarely stops early,
and both sides count the tokens they actually generated. `--serve KEY=VALUE` overrides a serve param
(e.g. cb_block_size=64) for one run, to compare settings.

    .venv/bin/python benchmarks/bench_serve.py [--requests 64] [--max-tokens 32] [--clients 1 4 16] [--rounds 3] [--model DIR] [--serve KEY=VALUE ...]
        [--backend transformers|vllm] [--device cpu|cuda] [--naive-requests N] [--output PATH]

Prints a markdown table and writes benchmarks/results/serve.json (gitignored), or --output.
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


def naive_loop(model_dir: Path, prompts: list[str], max_tokens: int, torch_threads: int, device: str = "cpu") -> dict:
    """One request at a time: tokenize, generate (greedy), decode; latency per request, tokens actually generated.

    `torch_threads` 0 keeps torch's default (one per core). On `device` cuda the model runs in bf16.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops.serving.probes import RequestResult

    torch.set_num_threads(torch_threads or os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
    with torch.inference_mode():  # warm-up, not timed (the server gets its first requests before timing too)
        model.generate(**tokenizer(prompts[0], return_tensors="pt").to(device), max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    results = []
    start = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            t0 = time.perf_counter()
            inputs = tokenizer(prompt, return_tensors="pt").to(device)
            output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            latency = time.perf_counter() - t0
            results.append(RequestResult(True, latency, 0.0, int(output.shape[1] - inputs["input_ids"].shape[1])))
    return summarize(results, time.perf_counter() - start, clients=1)


def served(model_dir: Path, clients_list: list[int], requests: int, max_tokens: int, rounds: int, overrides: dict[str, str], workdir: Path, backend: str = "transformers") -> tuple[list[dict], dict]:
    """Rows for each client count: through the proxy and straight at the backend socket, the median of `rounds` alternating runs each."""
    from llmops.serving.backends import backend_model_id, inspect_model
    from llmops.serving.probes import load_test
    from llmops.serving.server import serving

    cfg = load_params(ROOT / "params.yaml").serve
    cfg = cfg.model_validate(cfg.model_dump() | {"health_timeout_s": 300, "request_timeout_s": 600} | overrides)
    key = "bench-" + os.urandom(8).hex()
    rows = []
    with serving(inspect_model(model_dir, "bench"), cfg, backend, key, port=0, log_dir=workdir / "logs") as server:
        targets = {
            "direct": {"base_url": "http://backend/v1", "model": backend_model_id(backend, server.model), "uds": str(server.backend_socket)},
            "proxy": {"base_url": server.openai_base_url, "model": "bench"},
        }
        for target in targets.values():  # warm-up, not timed
            load_test(api_key=key, clients=4, requests=8, max_tokens=4, timeout_s=600, **target)
        for clients in clients_list:
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            for _ in range(rounds):
                for name, target in targets.items():
                    runs[name].append(load_test(api_key=key, clients=clients, requests=requests, max_tokens=max_tokens, timeout_s=600, **target))
            for name, results in runs.items():
                median = sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]
                rows.append(median | {"mode": name, "rounds_tokens_per_s": [round(r["tokens_per_s"], 1) for r in results]})
    return rows, cfg.model_dump()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3, help="alternating proxy/direct runs per client count; the median is reported")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--serve", action="append", default=[], metavar="KEY=VALUE", help="override a serve param for this run")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers", help="what serves (vllm: a GPU host with `make vllm`)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the naive loop runs (cuda: bf16)")
    parser.add_argument("--naive-requests", type=int, default=None, help="requests of the naive loop (default: --requests)")
    parser.add_argument("--output", type=Path, default=RESULTS / "serve.json", help="where the JSON results go")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    overrides = dict(item.split("=", 1) for item in args.serve)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        model_dir = args.model.resolve() if args.model else tiny_model(workdir / "tiny")
        prompts = [LOAD_PROMPTS[i % len(LOAD_PROMPTS)] for i in range(args.requests)]
        print(f"model {model_dir if args.model else 'tiny preset (random weights)'}; {args.backend}; {args.requests} requests x {args.max_tokens} tokens; {os.cpu_count()} CPU cores; serve overrides {overrides or 'none'}", flush=True)
        naive_prompts = prompts[: args.naive_requests] if args.naive_requests else prompts
        if args.device == "cuda":
            naive = {"naive loop, cuda bf16": naive_loop(model_dir, naive_prompts, args.max_tokens, 0, "cuda")}
        else:
            threads = int(overrides.get("torch_threads", load_params(ROOT / "params.yaml").serve.torch_threads))
            naive = {f"naive loop, {n or 'default'} torch threads": naive_loop(model_dir, naive_prompts, args.max_tokens, n) for n in dict.fromkeys([0, threads])}
        for name, row in naive.items():
            print(f"{name}: {row['tokens_per_s']:.1f} tokens/s", flush=True)
        rows, serve_cfg = served(model_dir, args.clients, args.requests, args.max_tokens, args.rounds, overrides, workdir, args.backend)

    direct = {r["clients"]: r["tokens_per_s"] for r in rows if r["mode"] == "direct"}
    baselines = list(naive.values())
    versus_naive = " | ".join(f"vs naive ({name.split(', ')[1]})" for name in naive)
    print()
    print(f"| mode | clients | requests | errors | tokens | wall s | tokens/s (rounds) | p50 s | p95 s | TTFT p50 s | {versus_naive} | proxy / direct |")
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(naive) + "---|")
    names = {"direct": f"{args.backend}, backend socket, no proxy", "proxy": f"{args.backend}, through the proxy"}
    for name, row in list(naive.items()) + [(names[r["mode"]], r) for r in rows]:
        ttft = "-" if np.isnan(row["ttft_p50_s"]) else f"{row['ttft_p50_s']:.3f}"
        rounds = f" ({', '.join(map(str, row['rounds_tokens_per_s']))})" if "rounds_tokens_per_s" in row else ""
        versus = f"{row['tokens_per_s'] / direct[row['clients']]:.3f}" if row.get("mode") == "proxy" else "-"
        ratios = " | ".join(f"{row['tokens_per_s'] / b['tokens_per_s']:.2f}x" for b in baselines)
        print(
            f"| {name} | {row['clients']} | {row['requests']} | {row['errors']} | {row['completion_tokens']} | {row['wall_s']:.1f} | {row['tokens_per_s']:.1f}{rounds} | "
            f"{row['latency_p50_s']:.3f} | {row['latency_p95_s']:.3f} | {ttft} | {ratios} | {versus} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": platform.platform(), "cpus": os.cpu_count(), "backend": args.backend, "device": args.device, "requests": args.requests,
        "max_tokens": args.max_tokens, "serve": serve_cfg, "naive": naive, "served": rows,
    }  # fmt: skip
    args.output.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwritten {args.output}")


if __name__ == "__main__":
    main()
