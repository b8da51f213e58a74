"""The GPU path checked end to end on one NVIDIA GPU: vLLM install, bf16 pretraining (tokens/s, MFU), quantization,
vLLM serving (plain, quantized, LoRA) and vLLM against a naive generate loop; one JSON report and its Markdown.

Steps, in order (each with its own time limit; a failed step is recorded and the next one runs):

  vllm               `make vllm` (vLLM in .venv-vllm)
  data               ingest, validate, dedup, tokenize in the work directory (or, with --data-from ROOT, a copy of
                     ROOT's data/dedup, data/tokens and models/tokenizer)
  pretrain           the `125m` preset in bf16 on the GPU for --pretrain-steps optimizer steps; tokens/s and MFU are
                     the stage's own (llmops.training.runtime against llmops.training.model.PEAK_BF16_FLOPS)
  finetune           LoRA fine-tune of that model (the merged model and the adapter)
  bench              benchmarks/bench_serve.py: vLLM at 1, 16 and 64 clients against a one-request-at-a-time
                     HF generate loop on the same GPU, on the fine-tuned model
  quantize           fp8_dynamic, w8a8 and w4a16 of the fine-tuned model (the quantize stage: llm-compressor)
  serve-bf16, serve-fp8_dynamic, serve-w4a16, serve-w8a8, serve-lora
                     `llmops serve --backend vllm` of each, then a smoke test and a load test through its API

The order puts the goals first (a step gets at most what is left of --budget-s).

Every stage runs as `llmops stage NAME --params WORK/params.yaml --no-track` in a work directory of its own
(default OUT/work): params.yaml there is the repository's with the overrides below (and any --set) written in,
so the repository's data and models are never touched.

    benchmarks/gpu_check.sh --dry-run                  # the plan: every command with its arguments, no GPU needed
    benchmarks/gpu_check.sh                            # all steps, report in reports/gpu_check/
    benchmarks/gpu_check.sh --steps serve-w4a16,bench  # rerun some steps (same --out/--work)

Writes OUT/report.json and OUT/report.md (atomically, after every step, so a killed run leaves the steps done);
a rerun with --steps and the same --out/--work keeps the other steps' results of the last run in the report.

Needs: one NVIDIA GPU and a CUDA build of torch in --python (checked first: without them the run stops at once,
exit 2, naming what is missing); `make vllm` needs the package index (vLLM 0.33 and its torch 2.14). Exit 0 when
every step passed, 1 when one did not (the report says which and why), 2 on a usage error or no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPORT_SCHEMA = "llmops.gpu_check/1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
BENCH_JSON = "bench_serve.json"
STATUSES = ("planned", "ok", "failed", "timeout", "skipped")
QUANT_SCHEMES = ("fp8_dynamic", "w8a8", "w4a16", "awq")
# Most wanted first, since the budget may end the run early: the goals (MFU, vLLM over naive, fp8 and w4a16 against
# bf16) before w8a8, the LoRA adapter and AWQ (its vLLM load is the check CPU hosts cannot make).
SERVE_TARGETS = ("bf16", "fp8_dynamic", "w4a16", "w8a8", "lora", "awq")
STEP_NAMES = ("vllm", "data", "pretrain", "finetune", "bench", "quantize", *(f"serve-{t}" for t in SERVE_TARGETS))
STEP_GROUPS = {"serve": tuple(f"serve-{t}" for t in SERVE_TARGETS)}
# Each step's wall-clock limit; the whole run is held to --budget-s as well (a step gets at most what is left).
STEP_TIMEOUT_S = {
    "vllm": 180, "data": 240, "pretrain": 240, "finetune": 150, "bench": 240, "quantize": 240,
    **{f"serve-{t}": 120 for t in SERVE_TARGETS},
}  # fmt: skip
BUDGET_S = 720  # issue 18: the whole check in at most 12 minutes
MFU_GOAL = 0.40  # LLM Foundry's published 1B on H100: 41.8%
VLLM_SPEEDUP_GOAL = 10.0  # vLLM tokens/s over the naive loop, at 16 and 64 clients
SPEEDUP_CLIENTS = (16, 64)
BENCH_CLIENTS = (1, 16, 64)
TAIL_CHARS = 2000
# vLLM in the serve steps and in the bench leaves room for the naive loop's model (same GPU, same time in the bench).
GPU_MEMORY_UTILIZATION = 0.5


@dataclass(frozen=True)
class Command:
    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment

    def shell(self) -> str:
        """The command as one shell line (what the dry run prints)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"(cd {shlex.quote(str(self.cwd))} && {'env ' + env + ' ' if env else ''}{shlex.join(self.argv)})"


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    commands: list[Command]
    serve: dict[str, Any] | None = None  # serve steps: the model, its served name, port and load-test shape


@dataclass
class StepResult:
    name: str
    title: str
    commands: list[str]
    timeout_s: float
    status: str = "planned"
    seconds: float | None = None
    returncode: int | None = None
    error_tail: str = ""
    log: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


class NoGpuError(RuntimeError):
    """No NVIDIA GPU visible to the check's Python (torch.cuda) or the driver (nvidia-smi)."""


# --------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu_check", help="report folder (report.json, report.md, bench_serve.json)")
    parser.add_argument("--work", type=Path, default=None, help="work directory: params.yaml, data, models, logs (default OUT/work)")
    parser.add_argument("--dry-run", action="store_true", help="print every command and write the report with every step planned; no GPU needed")
    parser.add_argument("--steps", default="", help=f"comma-separated subset, in any order (run in plan order): {', '.join(STEP_NAMES)}, or 'serve' for all serve steps")
    parser.add_argument("--python", default=sys.executable, help="Python that runs llmops and the benchmark (default: this one)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's limit; each step gets at most what is left")
    parser.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS", help="one step's limit (repeatable)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="optimizer steps of the 125m pretraining")
    parser.add_argument("--pretrain-batch", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--pretrain-seq-len", type=int, default=1024)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, TFLOP/s (default: llmops' table by device name)")
    parser.add_argument("--data-from", type=Path, default=None, help="copy data/dedup, data/tokens and models/tokenizer from this repository root instead of running the data stages")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="another params override for the work directory (repeatable)")
    parser.add_argument("--port", type=int, default=18080, help="public port of the serve steps")
    parser.add_argument("--load-clients", type=int, default=16, help="serve steps: concurrent clients of the load test")
    parser.add_argument("--load-requests", type=int, default=64, help="serve steps: requests of the load test")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (serve load tests and the bench)")
    parser.add_argument("--bench-requests", type=int, default=96, help="bench: requests per client count")
    parser.add_argument("--naive-requests", type=int, default=16, help="bench: requests of the naive loop (its tokens/s does not depend on clients)")
    return parser


def selected_steps(spec: str) -> list[str]:
    """`--steps` as step names in plan order; an unknown name is an error that lists the known ones."""
    if not spec.strip():
        return list(STEP_NAMES)
    wanted: set[str] = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in STEP_GROUPS:
            wanted.update(STEP_GROUPS[item])
        elif item in STEP_NAMES:
            wanted.add(item)
        else:
            raise ValueError(f"--steps: unknown step {item!r}; steps: {', '.join(STEP_NAMES)} (or 'serve' for all serve steps)")
    return [s for s in STEP_NAMES if s in wanted]


def step_timeouts(items: list[str]) -> dict[str, float]:
    timeouts = dict(STEP_TIMEOUT_S)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in STEP_NAMES:
            raise ValueError(f"--timeout {item!r}: expected STEP=SECONDS with STEP one of {', '.join(STEP_NAMES)}")
        try:
            timeouts[name] = float(value)
        except ValueError:
            raise ValueError(f"--timeout {item!r}: {value!r} is not a number of seconds") from None
    return timeouts


def work_overrides(args: argparse.Namespace) -> list[str]:
    """The params.yaml overrides of the work directory: the 125m preset in bf16 on the GPU, then the user's --set."""
    budget = args.pretrain_steps * args.pretrain_batch * args.pretrain_seq_len
    return [
        "pretrain.preset=125m",
        f"pretrain.seq_len={args.pretrain_seq_len}",
        f"pretrain.batch_size={args.pretrain_batch}",
        "pretrain.grad_accum=1",
        f"pretrain.token_budget={budget}",
        "pretrain.eval_tokens=65536",
        "train.device=cuda",
        "train.precision=bf16",
        "train.launcher=none",
        "train.log_every=10",  # a loss read-back every step would stall the GPU; MFU is averaged over these windows
        "train.eval_every=0",
        f"train.save_every={args.pretrain_steps + 1}",  # no mid-run checkpoint in a throughput run
        f"quantize.schemes=[{', '.join(QUANT_SCHEMES)}]",
        "quantize.humaneval=false",  # quality is held-out perplexity here; HumanEval needs the sandbox and minutes
        "quantize.latency_repeats=3",
        f"serve.gpu_memory_utilization={GPU_MEMORY_UTILIZATION}",
        "serve.health_timeout_s=110",
        *args.overrides,
    ]


# --------------------------------------------------------------------------------------------- plan


def plan(args: argparse.Namespace) -> tuple[list[Step], Path]:
    """Every step with its commands, resolved against --out/--work/--python; returns (steps, work dir)."""
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out / "work"
    params = work / "params.yaml"
    env = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "LLMOPS_PROGRESS": "0"}
    if not os.environ.get("LLMOPS_VLLM_BIN"):  # `make vllm` puts it here, whichever Python runs llmops (--python)
        env["LLMOPS_VLLM_BIN"] = str(ROOT / ".venv-vllm" / "bin" / "vllm")

    def llmops(*argv: str) -> Command:
        return Command([args.python, "-m", "flows.cli", *argv], work, env)

    def stage(name: str) -> Command:
        return llmops("stage", name, "--params", str(params), "--no-track")

    if args.data_from:
        src = Path(args.data_from).resolve()
        data = [Command(["cp", "-a", str(src / rel), str(work / rel)], work) for rel in ("data/dedup", "data/tokens", "models/tokenizer")]
        data.insert(0, Command(["mkdir", "-p", str(work / "data"), str(work / "models")], work))
    else:
        data = [stage(s) for s in ("ingest", "validate", "dedup", "tokenize")]
    bench = [
        args.python, str(ROOT / "benchmarks" / "bench_serve.py"),
        "--backend", "vllm", "--device", "cuda", "--model", str(work / "models" / "finetune"),
        "--clients", *map(str, BENCH_CLIENTS), "--requests", str(args.bench_requests), "--max-tokens", str(args.max_tokens),
        "--rounds", "1", "--naive-requests", str(args.naive_requests), "--output", str(out / BENCH_JSON),
        "--serve", f"gpu_memory_utilization={GPU_MEMORY_UTILIZATION}", "--serve", "health_timeout_s=200",
    ]  # fmt: skip
    steps = [
        Step("vllm", "vLLM into .venv-vllm (`make vllm`)", [Command(["make", "vllm"], ROOT, {"PIP_RETRIES": "1", "PIP_TIMEOUT": "20"})]),
        Step("data", "data stages: ingest, validate, dedup, tokenize" if not args.data_from else f"data copied from {args.data_from}", data),
        Step("pretrain", f"pretrain 125m, bf16, {args.pretrain_steps} steps x {args.pretrain_batch} x {args.pretrain_seq_len} tokens", [stage("pretrain")]),
        Step("finetune", "LoRA fine-tune of the 125m model", [stage("finetune")]),
        Step("bench", f"vLLM vs naive HF generate loop at {', '.join(map(str, BENCH_CLIENTS))} clients (bench_serve.py)", [Command(bench, ROOT, env)]),
        Step("quantize", f"quantize the fine-tuned model: {', '.join(QUANT_SCHEMES)}", [stage("quantize")]),
    ]
    models = {"bf16": work / "models" / "finetune", "lora": work / "models" / "adapter"} | {s: work / "models" / "quantized" / s for s in QUANT_SCHEMES}
    for target in SERVE_TARGETS:
        model_dir = models[target]
        serve = {
            "model": str(model_dir),
            "served_name": model_dir.name,  # `llmops serve` names a local directory by its folder name
            "port": args.port,
            "load_clients": args.load_clients,
            "load_requests": args.load_requests,
            "max_tokens": args.max_tokens,
        }
        cmd = llmops("serve", "--model", str(model_dir), "--backend", "vllm", "--port", str(args.port), "--params", str(params))
        what = "the LoRA adapter (vLLM --enable-lora)" if target == "lora" else f"the {target} model"
        steps.append(Step(f"serve-{target}", f"`llmops serve --backend vllm` of {what}; smoke + load test", [cmd], serve))
    return steps, work


def write_work_params(work: Path, overrides: list[str]) -> Any:
    """WORK/params.yaml: the repository's, with `overrides` written in and validated whole (one atomic rename); returns
    the loaded params (read once: the run reads them from here, never again from the repository's file)."""
    from llmops.params.load import load_params, write_overrides

    work.mkdir(parents=True, exist_ok=True)
    target = work / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", target)  # fresh each run: a rerun's overrides replace the last run's
    write_overrides(target, overrides)
    return load_params(target)


def check_overrides(overrides: list[str]) -> Any:
    """The repository's params.yaml with the overrides, validated without writing anything (the dry run)."""
    from llmops.params.load import load_params

    return load_params(ROOT / "params.yaml", overrides)


# --------------------------------------------------------------------------------------------- GPU


GPU_PROBE = (
    "import json, torch\n"
    "ok = torch.cuda.is_available()\n"
    "print(json.dumps({'cuda': ok, 'torch': torch.__version__, 'cuda_version': torch.version.cuda,"
    " 'name': torch.cuda.get_device_name() if ok else None, 'count': torch.cuda.device_count() if ok else 0}))\n"
)


def detect_gpu(python: str) -> dict[str, Any]:
    """The GPU as `python`'s torch and nvidia-smi see it; NoGpuError (saying which of them found none) otherwise."""
    smi = shutil.which("nvidia-smi")
    smi_line = "nvidia-smi: not found on PATH"
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        smi_line = out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else f"nvidia-smi: exit {out.returncode}, {(out.stderr or out.stdout).strip()[:200]}"
    probe = subprocess.run([python, "-c", GPU_PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        raise NoGpuError(f"no NVIDIA GPU usable: {python} could not import torch ({probe.stderr.strip()[-300:]}); {smi_line}")
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    if not info["cuda"]:
        raise NoGpuError(
            f"no NVIDIA GPU: torch.cuda.is_available() is False in {python} (torch {info['torch']}"
            f"{', a CPU-only build' if not info['cuda_version'] else ''}); {smi_line}. This check needs one NVIDIA GPU "
            "(H100/H200 class) and a CUDA build of torch; `--dry-run` prints the plan without one."
        )
    info["nvidia_smi"] = smi_line
    return info


def peak_flops_for(device_name: str | None, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, where it came from): --peak-tflops, else llmops' PEAK_BF16_FLOPS entry for the device
    name, the longest key it contains (so "H100 PCIe" wins over "H100"), the rule llmops.training.model.peak_flops uses."""
    from llmops.training.model import PEAK_BF16_FLOPS, peak_flops_key

    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"--peak-tflops {override_tflops}: must be > 0")
        return override_tflops * 1e12, "--peak-tflops"
    if not device_name:
        return None, "unknown until run (torch.cuda.get_device_name())"
    if key := peak_flops_key(device_name):
        return PEAK_BF16_FLOPS[key], f"PEAK_BF16_FLOPS[{key!r}]"
    return None, f"{device_name!r} is not in llmops.training.model.PEAK_BF16_FLOPS; pass --peak-tflops"


# --------------------------------------------------------------------------------------------- running


def run_command(cmd: Command, log: Path, timeout_s: float) -> int | None:
    """Run one command (its own process group), output appended to `log`; the exit code, or None past `timeout_s`."""
    with log.open("a") as f:
        f.write(f"$ {cmd.shell()}\n")
        f.flush()
        proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=os.environ | cmd.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            f.write(f"\n[gpu_check] killed after {timeout_s:.0f} s\n")
            return None


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process, its group and every descendant (vLLM's engine runs in sessions of its own), SIGKILL what is
    left after a grace period: llmops' own stop for the servers it starts."""
    from llmops.serving.server import stop_process_group

    stop_process_group(proc)


def wait_health(url: str, key: str, proc: subprocess.Popen, deadline: float) -> float:
    """Poll the public /health until 200; RuntimeError when the server exits or the deadline passes."""
    start = time.monotonic()
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`llmops serve` exited with code {proc.returncode} before /health answered")
        request = urllib.request.Request(f"{url}/health", headers={"Authorization": f"Bearer {key}"})
        try:
            # The proxy's /health generates a token, so it may take a while; never past the step's deadline.
            with urllib.request.urlopen(request, timeout=max(1.0, min(45.0, deadline - time.monotonic()))) as response:
                if response.status == 200:
                    return time.monotonic() - start
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(2)
    raise RuntimeError(f"{url}/health did not answer 200 in time; last: {last}")


def run_serve(step: Step, log: Path, timeout_s: float) -> dict[str, Any]:
    """`llmops serve` in the background, /health, the smoke test and a load test through the proxy, then SIGTERM."""
    from llmops.serving.probes import load_test, smoke_test

    spec = step.serve or {}
    key = "gpu-check-" + os.urandom(12).hex()
    cmd = step.commands[0]
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{spec['port']}"
    with log.open("a") as f:
        f.write(f"$ {cmd.shell()}\n")
        f.flush()
        proc = subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=os.environ | cmd.env | {"LLMOPS_API_KEY": key}, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        health_s = wait_health(url, key, proc, deadline)
        left = max(deadline - time.monotonic(), 5)
        smoke = smoke_test(f"{url}/v1", key, spec["served_name"], spec["max_tokens"], timeout_s=left)
        left = max(deadline - time.monotonic(), 5)
        load = load_test(f"{url}/v1", key, spec["served_name"], clients=spec["load_clients"], requests=spec["load_requests"], max_tokens=spec["max_tokens"], timeout_s=left)
    finally:
        stop_group(proc)
    if load["errors"]:
        raise RuntimeError(f"load test: {load['errors']} of {load['requests']} requests failed: {load['first_errors']}")
    return {"startup_s": health_s, "smoke": smoke, "load": load}


def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def execute(step: Step, result: StepResult, work: Path, timeout_s: float) -> None:
    """Run a step into `result` (status, seconds, exit code, error tail, metrics); never raises for a step's failure."""
    log = work / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    result.log, result.timeout_s = str(log), round(timeout_s, 1)
    start = time.monotonic()
    try:
        if step.serve is not None:
            result.metrics = run_serve(step, log, timeout_s)
            result.status = "ok"
        else:
            for cmd in step.commands:
                code = run_command(cmd, log, timeout_s - (time.monotonic() - start))
                result.returncode = code
                if code is None:
                    result.status = "timeout"
                    break
                if code != 0:
                    result.status = "failed"
                    break
            else:
                result.status = "ok"
    except Exception as exc:  # a step's failure is data for the report; the next step still runs
        result.status = "timeout" if time.monotonic() - start >= timeout_s else "failed"
        with log.open("a") as f:
            f.write(f"\n[gpu_check] {type(exc).__name__}: {exc}\n")
    result.seconds = round(time.monotonic() - start, 1)
    if result.status != "ok":
        result.error_tail = tail(log)


# --------------------------------------------------------------------------------------------- metrics and summary


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect_metrics(name: str, work: Path, out: Path, gpu: dict[str, Any] | None, peak_override: float | None) -> dict[str, Any]:
    """What a finished step measured, read from the files the stage or benchmark wrote."""
    if name == "pretrain" and (m := read_json(work / "metrics" / "pretrain.json")):
        table_peak, _ = peak_flops_for((gpu or {}).get("name"))
        peak, peak_source = peak_flops_for((gpu or {}).get("name"), peak_override)
        stage_mfu = m.get("mfu")  # the stage's own: mean over logging windows, against the table's peak
        # Against another peak (--peak-tflops) the same throughput is the stage's MFU scaled by the ratio of peaks.
        mfu = stage_mfu * table_peak / peak if stage_mfu is not None and table_peak and peak else None
        keys = ("parameters", "non_embedding_parameters", "steps", "tokens", "tokens_per_s", "train_seconds", "flops_per_token", "train_loss", "eval_loss")
        return {k: m.get(k) for k in keys} | {"stage_mfu": stage_mfu, "mfu": mfu, "peak_flops": peak, "peak_source": peak_source}
    if name == "finetune" and (m := read_json(work / "metrics" / "finetune.json")):
        return {k: m.get(k) for k in ("method", "steps", "tokens_per_s", "train_seconds", "eval_loss_before", "eval_loss")}
    if name == "quantize" and (m := read_json(work / "metrics" / "quantize.json")):
        keys = ("perplexity", "perplexity_increase", "within_tolerance", "size_mb", "size_ratio", "quantize_seconds")
        rows = {scheme: {k: row.get(k) for k in keys if k in row} for scheme, row in m.items() if isinstance(row, dict) and "perplexity" in row}
        return {"schemes": rows, "skipped": m.get("skipped", {})}
    if name == "bench" and (m := read_json(out / BENCH_JSON)):
        naive = {name: row["tokens_per_s"] for name, row in m.get("naive", {}).items()}
        served = {f"{r['mode']}@{r['clients']}": {"tokens_per_s": r["tokens_per_s"], "errors": r["errors"], "latency_p50_s": r["latency_p50_s"]} for r in m.get("served", [])}
        # The baseline is the fastest naive variant (one on a GPU; on CPU, per torch thread setting).
        return {"naive_tokens_per_s": max(naive.values(), default=None), "naive": naive, "served": served}
    return {}


def summarize(results: list[StepResult], max_perplexity_increase: float) -> list[dict[str, Any]]:
    """Goal vs measured: MFU, vLLM over naive at 16 and 64 clients, fp8/w4a16 perplexity and tokens/s vs bf16."""
    by = {r.name: r for r in results}

    def metrics(name: str) -> dict[str, Any]:
        r = by.get(name)
        return r.metrics if r is not None and r.status == "ok" else {}

    rows: list[dict[str, Any]] = []
    mfu = metrics("pretrain").get("mfu")
    rows.append(_row("MFU, 125m pretraining in bf16", f">= {MFU_GOAL:.0%}", None if mfu is None else f"{mfu:.1%}", None if mfu is None else mfu >= MFU_GOAL))
    bench = metrics("bench")
    naive = bench.get("naive_tokens_per_s")
    for clients in SPEEDUP_CLIENTS:
        served = bench.get("served", {}).get(f"proxy@{clients}", {}).get("tokens_per_s")
        ratio = served / naive if served and naive else None
        rows.append(_row(f"vLLM / naive tokens/s, {clients} clients", f">= {VLLM_SPEEDUP_GOAL:.0f}x", None if ratio is None else f"{ratio:.1f}x", None if ratio is None else ratio >= VLLM_SPEEDUP_GOAL))
    schemes = metrics("quantize").get("schemes", {})
    skipped = metrics("quantize").get("skipped", {})
    bf16_tps = metrics("serve-bf16").get("load", {}).get("tokens_per_s")
    for scheme in ("fp8_dynamic", "w4a16"):
        increase = schemes.get(scheme, {}).get("perplexity_increase")
        measured = f"{increase:+.2%}" if increase is not None else (f"skipped by the stage: {skipped[scheme]}" if scheme in skipped else None)
        rows.append(_row(
            f"{scheme} held-out perplexity vs bf16", f"<= +{max_perplexity_increase:.0%} (quantize.max_perplexity_increase)",
            measured, None if increase is None else increase <= max_perplexity_increase,
        ))  # fmt: skip
        tps = metrics(f"serve-{scheme}").get("load", {}).get("tokens_per_s")
        ratio = tps / bf16_tps if tps and bf16_tps else None
        rows.append(_row(f"{scheme} vLLM tokens/s vs bf16 (serve load test)", "reported (no number set)", None if ratio is None else f"{ratio:.2f}x", None))
    return rows


def _row(goal: str, target: str, measured: str | None, met: bool | None) -> dict[str, Any]:
    return {"goal": goal, "target": target, "measured": measured, "met": met}


# --------------------------------------------------------------------------------------------- report


def new_report(args: argparse.Namespace, results: list[StepResult], work: Path, gpu: dict[str, Any] | None, tolerance: float) -> dict[str, Any]:
    """The report of `results` so far; `tolerance` is quantize.max_perplexity_increase of the work params."""
    peak, source = peak_flops_for((gpu or {}).get("name"), args.peak_tflops)
    return {
        "schema": REPORT_SCHEMA,
        "mode": "dry-run" if args.dry_run else "run",
        "command": ["benchmarks/gpu_check.sh", *args.argv],
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": None,
        "budget_s": args.budget_s,
        "work": str(work),
        "gpu": gpu,
        "peak_flops": peak,
        "peak_source": source,
        "overrides": work_overrides(args),
        "steps": [asdict(r) for r in results],
        "perplexity_tolerance": tolerance,
        "summary": summarize(results, tolerance),
    }


def check_report(report: dict[str, Any], source: str) -> dict[str, Any]:
    """A report as written by this script, or ValueError naming the key and the rule."""
    for key in ("schema", "mode", "steps", "summary", "budget_s"):
        if key not in report:
            raise ValueError(f"{source}: key {key!r} missing (a gpu_check report has schema, mode, steps, summary, budget_s)")
    if report["schema"] != REPORT_SCHEMA:
        raise ValueError(f"{source}: schema {report['schema']!r}, expected {REPORT_SCHEMA!r}")
    for i, step in enumerate(report["steps"]):
        if step.get("name") not in STEP_NAMES:
            raise ValueError(f"{source}: steps[{i}].name {step.get('name')!r} is not a gpu_check step ({', '.join(STEP_NAMES)})")
        if step.get("status") not in STATUSES:
            raise ValueError(f"{source}: steps[{i}] ({step['name']}) status {step.get('status')!r} is not one of {', '.join(STATUSES)}")
    return report


def read_report(path: Path) -> dict[str, Any]:
    return check_report(json.loads(Path(path).read_text()), str(path))


def render_markdown(report: dict[str, Any]) -> str:
    gpu = report.get("gpu") or {}
    peak = report.get("peak_flops")
    lines = [
        f"# GPU check ({report['mode']})",
        "",
        f"- command: `{shlex.join(report['command'])}`",
        f"- started {report['started_at']}, wall {_fmt(report.get('wall_s'), '{:.0f} s')} of a {report['budget_s']:.0f} s budget",
        f"- GPU: {gpu.get('name') or 'not probed'}; torch {gpu.get('torch', '-')}, CUDA {gpu.get('cuda_version') or '-'}; {gpu.get('nvidia_smi', '')}".rstrip("; "),
        f"- dense bf16 peak for MFU: {_fmt(peak and peak / 1e12, '{:.0f} TFLOP/s')} ({report.get('peak_source', '')})",
        f"- work directory: `{report['work']}`",
        *([f"- carried over from the last run's report (not rerun): {', '.join(report['carried_over'])}"] if report.get("carried_over") else []),
        "",
        "## Goals",
        "",
        "| goal | target | measured | met |",
        "|---|---|---|---|",
    ]
    for row in report["summary"]:
        met = {True: "yes", False: "NO", None: "-"}[row["met"]]
        lines.append(f"| {row['goal']} | {row['target']} | {row['measured'] or 'not measured'} | {met} |")
    lines += ["", "## Steps", "", "| step | status | seconds | limit s | what |", "|---|---|---|---|---|"]
    for step in report["steps"]:
        lines.append(f"| {step['name']} | {step['status']} | {_fmt(step['seconds'], '{:.1f}')} | {step['timeout_s']:.0f} | {step['title']} |")
    for step in report["steps"]:
        lines += ["", f"### {step['name']}: {step['status']}", ""]
        lines += [f"    $ {c}" for c in step["commands"]]
        if step["metrics"]:
            lines += ["", "```json", json.dumps(step["metrics"], indent=2, default=str), "```"]
        if step["error_tail"]:
            lines += ["", f"exit code {step['returncode']}; end of {step['log']}:", "", "```", step["error_tail"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def steps_from_markdown(text: str) -> dict[str, str]:
    """step -> status, read back from the Markdown's steps table."""
    rows = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith("| step | status |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] and not cells[0].startswith("---"):
                rows[cells[0]] = cells[1]
    return rows


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    check_report(report, "the report being written")
    for name, text in ((REPORT_JSON, json.dumps(report, indent=2, default=str) + "\n"), (REPORT_MD, render_markdown(report))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=out)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / name)


# --------------------------------------------------------------------------------------------- main


def carried_over(out: Path, work: Path, names: list[str]) -> list[StepResult]:
    """The results of the steps this run leaves out, from the last run's report in `out` with the same work directory,
    so a rerun of some steps (--steps) still ends with one report of every step."""
    try:
        previous = read_report(out / REPORT_JSON)
    except (OSError, ValueError):
        return []
    if previous["mode"] != "run" or previous.get("work") != str(work):
        return []
    return [StepResult(**s) for s in previous["steps"] if s["name"] not in names]


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        names = selected_steps(args.steps)
        timeouts = step_timeouts(args.timeout)
        if args.dry_run:
            tolerance = check_overrides(work_overrides(args)).quantize.max_perplexity_increase
        peak_flops_for(None, args.peak_tflops)
    except Exception as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    steps, work = plan(args)
    steps = [s for s in steps if s.name in names]
    results = [StepResult(s.name, s.title, [c.shell() for c in s.commands], timeouts[s.name]) for s in steps]

    if args.dry_run:
        print(f"gpu_check --dry-run: {len(steps)} steps, budget {args.budget_s:.0f} s, work directory {work}")
        print(f"write {work / 'params.yaml'}: the repository's params.yaml with --set {' --set '.join(work_overrides(args))}")
        for i, (step, result) in enumerate(zip(steps, results, strict=True), 1):
            print(f"[{i}/{len(steps)}] {step.name}: {step.title} (limit {result.timeout_s:.0f} s)")
            for cmd in step.commands:
                print(f"  $ {cmd.shell()}")
            if step.serve:
                s = step.serve
                print(
                    f"  then: wait for http://127.0.0.1:{s['port']}/health, smoke test and load test ({s['load_clients']} clients, "
                    f"{s['load_requests']} requests x {s['max_tokens']} tokens) of model {s['served_name']!r}, SIGTERM"
                )
        report = new_report(args, results, work, None, tolerance)
        write_report(report, out)
        print(f"report skeleton: {out / REPORT_JSON}, {out / REPORT_MD}")
        return 0

    try:
        gpu = detect_gpu(args.python)
    except (NoGpuError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    try:
        tolerance = write_work_params(work, work_overrides(args)).quantize.max_perplexity_increase
    except Exception as exc:
        print(f"gpu_check: error: {work / 'params.yaml'}: {exc}", file=sys.stderr)
        return 2
    kept = carried_over(out, work, names)
    order = {name: i for i, name in enumerate(STEP_NAMES)}

    def all_results() -> list[StepResult]:
        return sorted(kept + results, key=lambda r: order[r.name])

    report = new_report(args, all_results(), work, gpu, tolerance)
    report["carried_over"] = [r.name for r in kept]
    write_report(report, out)
    print(f"gpu_check: {gpu['name']} (torch {gpu['torch']}); {len(steps)} steps within {args.budget_s:.0f} s; work {work}", flush=True)
    for step, result in zip(steps, results, strict=True):
        left = args.budget_s - (time.monotonic() - started)
        if left < 5:
            result.status, result.error_tail = "skipped", f"the {args.budget_s:.0f} s budget was spent before this step"
        else:
            print(f"[{step.name}] {step.title} (limit {min(result.timeout_s, left):.0f} s) ...", flush=True)
            execute(step, result, work, min(result.timeout_s, left))
            if result.status == "ok":
                result.metrics = result.metrics or collect_metrics(step.name, work, out, gpu, args.peak_tflops)
            print(f"[{step.name}] {result.status} in {result.seconds:.0f} s" + (f": see {result.log}" if result.status != "ok" else ""), flush=True)
        report["steps"] = [asdict(r) for r in all_results()]
        report["summary"] = summarize(all_results(), tolerance)
        report["wall_s"] = round(time.monotonic() - started, 1)
        write_report(report, out)
    print(render_markdown(report).split("## Steps")[0].rstrip())
    print(f"\nreport: {out / REPORT_JSON}, {out / REPORT_MD}")
    return 0 if all(r.status == "ok" for r in all_results()) else 1


if __name__ == "__main__":
    sys.exit(main())
