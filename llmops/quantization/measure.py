"""Footprint of one model directory: on-disk size, and (in a fresh process, so nothing else is resident) the memory
to load it and its CPU generation latency.

The child is `python -m llmops.quantization.measure MODEL_DIR NEW_TOKENS REPEATS ID ID ...`; it prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llmops.common import env
from llmops.common.errors import StageError

MB = 1024 * 1024


@dataclass
class Footprint:
    load_mb: float  # peak RSS growth from loading the model and one forward pass (compressed layers decompress then)
    peak_rss_mb: float  # the whole process's peak RSS (interpreter + torch + the model)
    weights_mb: float  # parameter + buffer bytes held after that forward pass
    ms_per_token: float  # median over the timed runs of generate's wall time / new tokens (greedy, batch 1)
    threads: int  # torch intra-op threads the timing ran with


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / MB


def _memory_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that across fork/exec,
    so a child would report its parent's peak (the stage's, ~1 GB) instead of its own."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024  # kB


def _warm_up(model_dir: Path) -> None:
    """Import and initialise what any model of this architecture needs (its modeling module, compressed-tensors, CPU
    kernels), so the memory measured next is the model's and not the libraries' (~0.5 GB here)."""
    import compressed_tensors  # noqa: F401  (loaded for every model alike, quantized or not)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    config.quantization_config = None
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)
    with torch.inference_mode():
        torch.nn.functional.linear(torch.ones(2, 8), torch.ones(8, 8)).softmax(-1)


def measure(model_dir: Path, prompt_ids: list[int], new_tokens: int, repeats: int) -> Footprint:
    """Load, one forward pass, then `repeats` timed greedy generations of exactly `new_tokens` tokens after a warm-up."""
    import statistics
    import time

    import torch

    from llmops.evaluation.generation import load_model

    _warm_up(model_dir)
    before = _memory_bytes("VmRSS")
    model, tokenizer = load_model(model_dir)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        model(input_ids=ids)
        peak = _memory_bytes("VmHWM")
        tensors = [*model.parameters(), *model.buffers()]
        weights = sum(t.numel() * t.element_size() for t in tensors)
        fixed = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        model.generate(input_ids=ids, **fixed)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(input_ids=ids, **fixed)
            times.append(time.perf_counter() - started)
    return Footprint(
        load_mb=(peak - before) / MB, peak_rss_mb=peak / MB, weights_mb=weights / MB,
        ms_per_token=1000 * statistics.median(times) / new_tokens, threads=torch.get_num_threads(),
    )


def measure_in_child(model_dir: Path, prompt_ids: list[int], new_tokens: int, repeats: int) -> Footprint:
    root = Path(__file__).resolve().parents[2]  # the checkout this code runs from, so the child imports the same code
    child_env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "llmops.quantization.measure", str(model_dir), str(new_tokens), str(repeats), *map(str, prompt_ids)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env)
    if out.returncode != 0:
        raise StageError(f"quantize: measuring {model_dir} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return Footprint(**json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str]) -> None:
    model_dir, new_tokens, repeats, *ids = argv
    os.environ.setdefault(env.PROGRESS, "0")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    footprint = measure(Path(model_dir), [int(i) for i in ids], int(new_tokens), int(repeats))
    print(json.dumps(asdict(footprint)))


if __name__ == "__main__":
    main(sys.argv[1:])
