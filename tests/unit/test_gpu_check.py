"""benchmarks/gpu_check.py on a CPU: the plan and its command lines (parsed by the real CLIs), the report format, the MFU
peak lookup, step failures and time limits, and the clear error of a real run without a GPU."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import ROOT

pytestmark = pytest.mark.unit

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check", ROOT / "benchmarks" / "gpu_check.py")


def _plan(tmp_path: Path, *argv: str):
    args = gpu_check.build_parser().parse_args(["--out", str(tmp_path / "out"), *argv])
    return gpu_check.plan(args)


def _short(argv: list[str]) -> str:
    """A command line reduced to what it runs: `make vllm`, `stage ingest`, `serve finetune`, `bench_serve.py`."""
    if argv[:2] == ["make", "vllm"]:
        return "make vllm"
    if argv[1:3] == ["-m", "flows.cli"]:
        sub = argv[3]
        return f"stage {argv[4]}" if sub == "stage" else f"serve {Path(argv[argv.index('--model') + 1]).name}"
    return Path(argv[1]).name


def _printed_argv(line: str) -> list[str]:
    """`(cd DIR && [env K=V ...] ARGV...)` as printed by the dry run -> ARGV."""
    words = shlex.split(line.removeprefix("(").removesuffix(")").split(" && ", 1)[1])
    if words[0] == "env":
        words = words[1:]
        while "=" in words[0]:
            words = words[1:]
    return words


EXPECTED_ORDER = [
    "make vllm",
    "stage ingest", "stage validate", "stage dedup", "stage tokenize",
    "stage pretrain", "stage finetune", "bench_serve.py", "stage quantize",
    "serve finetune", "serve fp8_dynamic", "serve w4a16", "serve w8a8", "serve adapter", "serve awq",
]  # fmt: skip


def test_dry_run_prints_every_command_in_order_and_writes_a_planned_report(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    argvs = [_printed_argv(line.strip()[2:]) for line in run.stdout.splitlines() if line.strip().startswith("$ ")]
    assert [_short(argv) for argv in argvs] == EXPECTED_ORDER
    report = gpu_check.read_report(out / "report.json")
    assert report["mode"] == "dry-run"
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEP_NAMES)
    assert {s["status"] for s in report["steps"]} == {"planned"}
    assert gpu_check.steps_from_markdown((out / "report.md").read_text()) == {name: "planned" for name in gpu_check.STEP_NAMES}
    assert not (out / "work").exists()  # a dry run writes the report only


def test_plan_runs_the_commands_in_the_expected_order(tmp_path):
    steps, _ = _plan(tmp_path)
    assert [_short(c.argv) for s in steps for c in s.commands] == EXPECTED_ORDER


def test_every_llmops_command_parses_with_the_real_cli(tmp_path):
    import typer

    from flows.cli import app

    group = typer.main.get_command(app)
    steps, work = _plan(tmp_path)
    parsed = {}
    for step in steps:
        for cmd in step.commands:
            if cmd.argv[1:3] != ["-m", "flows.cli"]:
                continue
            name, rest = cmd.argv[3], cmd.argv[4:]
            command = group.commands[name]
            try:
                ctx = command.make_context(name, list(rest))
            except typer.TyperException as exc:  # typer's click: usage errors, bad parameters, unknown options
                pytest.fail(f"{step.name}: `llmops {name} {' '.join(rest)}` is refused by the CLI: {exc}")
            parsed[step.name] = ctx.params
            assert Path(ctx.params["params_file"]) == work / "params.yaml"
    assert parsed["pretrain"]["name"] == "pretrain" and parsed["pretrain"]["track"] is False
    for target in gpu_check.SERVE_TARGETS:
        serve = parsed[f"serve-{target}"]
        assert serve["backend"] == "vllm" and serve["port"] == 18080
    assert Path(parsed["serve-lora"]["model"]) == work / "models" / "adapter"
    assert Path(parsed["serve-w4a16"]["model"]) == work / "models" / "quantized" / "w4a16"


def test_bench_command_parses_with_bench_serve_argparse(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    bench_serve = _load("bench_serve", ROOT / "benchmarks" / "bench_serve.py")
    steps, work = _plan(tmp_path)
    (bench,) = [c for s in steps if s.name == "bench" for c in s.commands]
    assert Path(bench.argv[1]) == ROOT / "benchmarks" / "bench_serve.py"
    args = bench_serve.build_parser().parse_args(bench.argv[2:])
    assert (args.backend, args.device, args.clients, args.rounds) == ("vllm", "cuda", [1, 16, 64], 1)
    assert args.model == work / "models" / "finetune"
    assert args.output == tmp_path / "out" / gpu_check.BENCH_JSON
    assert dict(item.split("=", 1) for item in args.serve)["gpu_memory_utilization"] == str(gpu_check.GPU_MEMORY_UTILIZATION)


def test_make_vllm_is_a_makefile_target():
    run = subprocess.run(["make", "-n", "vllm"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert ".venv-vllm" in run.stdout and "vllm==" in run.stdout


def test_work_params_hold_the_125m_bf16_gpu_run_and_load_cleanly(tmp_path):
    from llmops.params.load import load_params

    args = gpu_check.build_parser().parse_args(["--pretrain-steps", "200", "--set", "finetune.max_steps=40"])
    work = tmp_path / "work"
    gpu_check.write_work_params(work, gpu_check.work_overrides(args))
    params = load_params(work / "params.yaml")
    assert params.pretrain.preset == "125m" and params.pretrain.token_budget == 200 * 32 * 1024
    assert (params.train.precision, params.train.device) == ("bf16", "cuda")
    assert list(params.quantize.schemes) == ["fp8_dynamic", "w8a8", "w4a16", "awq"]
    assert params.finetune.max_steps == 40
    assert params.paths.finetune_model == work / "models" / "finetune"  # stages write in the work directory, not the repository


def test_a_bad_override_fails_the_dry_run_naming_the_key(tmp_path):
    run = subprocess.run([str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--set", "pretrain.presett=1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "pretrain.presett" in run.stderr and not (tmp_path / "report.json").exists()


def test_steps_subset_runs_in_plan_order_and_unknown_steps_are_named():
    assert gpu_check.selected_steps("serve-w4a16, bench,pretrain") == ["pretrain", "bench", "serve-w4a16"]
    assert gpu_check.selected_steps("serve") == [f"serve-{t}" for t in gpu_check.SERVE_TARGETS]
    with pytest.raises(ValueError, match="unknown step 'serv'.*vllm, data, pretrain"):
        gpu_check.selected_steps("serv")
    with pytest.raises(ValueError, match="STEP=SECONDS"):
        gpu_check.step_timeouts(["pretrain:30"])
    assert gpu_check.step_timeouts(["bench=90"])["bench"] == 90.0


def test_peak_table_lookup_by_device_name():
    from llmops.training.model import PEAK_BF16_FLOPS

    assert gpu_check.peak_flops_for("NVIDIA H200")[0] == PEAK_BF16_FLOPS["H200"] == 989e12
    assert gpu_check.peak_flops_for("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gpu_check.peak_flops_for("NVIDIA H100 PCIe") == (756e12, "PEAK_BF16_FLOPS['H100 PCIe']")  # the longer key wins
    peak, why = gpu_check.peak_flops_for("Tesla T4")
    assert peak is None and "not in llmops.training.model.PEAK_BF16_FLOPS" in why and "--peak-tflops" in why
    assert gpu_check.peak_flops_for("Tesla T4", 65.0) == (65e12, "--peak-tflops")
    with pytest.raises(ValueError, match="must be > 0"):
        gpu_check.peak_flops_for("NVIDIA H200", 0.0)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_pretrain_metrics_keep_the_stage_mfu_and_rescale_it_to_a_peak_override(tmp_path):
    stage = {"mfu": 0.30, "tokens_per_s": 250000.0, "flops_per_token": 5.0e8, "steps": 300, "train_seconds": 40.0}
    _write_json(tmp_path / "metrics" / "pretrain.json", stage)
    gpu = {"name": "NVIDIA H100 80GB HBM3"}
    table = gpu_check.collect_metrics("pretrain", tmp_path, tmp_path, gpu, None)
    assert table["mfu"] == pytest.approx(0.30) and table["peak_flops"] == 989e12
    halved = gpu_check.collect_metrics("pretrain", tmp_path, tmp_path, gpu, 494.5)
    assert halved["mfu"] == pytest.approx(0.60) and halved["stage_mfu"] == 0.30 and halved["peak_source"] == "--peak-tflops"


def _fixture_results() -> list:
    R = gpu_check.StepResult
    return [
        R("vllm", "vLLM", ["make vllm"], 180, "ok", 41.0, 0),
        R("pretrain", "pretrain", ["llmops stage pretrain"], 240, "ok", 70.2, 0, metrics={"mfu": 0.43, "tokens_per_s": 6.1e5}),
        R("quantize", "quantize", ["llmops stage quantize"], 180, "ok", 88.0, 0, metrics={"schemes": {"fp8_dynamic": {"perplexity_increase": 0.004}, "w4a16": {"perplexity_increase": 0.21}}}),
        R("serve-bf16", "serve", ["llmops serve"], 120, "ok", 50.0, metrics={"load": {"tokens_per_s": 9000.0, "clients": 16}}),
        R("serve-fp8_dynamic", "serve", ["llmops serve"], 120, "ok", 48.0, metrics={"load": {"tokens_per_s": 10800.0, "clients": 16}}),
        R("serve-w4a16", "serve", ["llmops serve"], 120, "timeout", 120.0, None, "health did not answer | in time", "/w/logs/serve-w4a16.log"),
        R("bench", "bench", ["bench_serve.py"], 240, "ok", 150.0, 0, metrics={"naive_tokens_per_s": 400.0, "served": {"proxy@16": {"tokens_per_s": 6000.0}, "proxy@64": {"tokens_per_s": 3000.0}}}),
    ]


def test_summary_compares_goals_with_measurements():
    rows = {r["goal"]: r for r in gpu_check.summarize(_fixture_results(), 0.10)}
    assert rows["MFU, 125m pretraining in bf16"] | {} == {"goal": "MFU, 125m pretraining in bf16", "target": ">= 40%", "measured": "43.0%", "met": True}
    assert (rows["vLLM / naive tokens/s, 16 clients"]["measured"], rows["vLLM / naive tokens/s, 16 clients"]["met"]) == ("15.0x", True)
    assert (rows["vLLM / naive tokens/s, 64 clients"]["measured"], rows["vLLM / naive tokens/s, 64 clients"]["met"]) == ("7.5x", False)
    assert rows["fp8_dynamic held-out perplexity vs bf16"]["met"] is True
    assert (rows["w4a16 held-out perplexity vs bf16"]["measured"], rows["w4a16 held-out perplexity vs bf16"]["met"]) == ("+21.00%", False)
    assert rows["fp8_dynamic vLLM tokens/s vs bf16 (serve load test)"]["measured"] == "1.20x"
    assert rows["w4a16 vLLM tokens/s vs bf16 (serve load test)"]["measured"] is None  # its serve step timed out


def test_report_round_trips_through_json_and_markdown(tmp_path):
    args = gpu_check.build_parser().parse_args(["--out", str(tmp_path)])
    args.argv = ["--out", str(tmp_path)]
    results = _fixture_results()
    report = gpu_check.new_report(args, results, tmp_path / "work", {"name": "NVIDIA H200", "torch": "2.11.0", "cuda_version": "13.0"}, 0.10)
    report["wall_s"] = 611.0
    gpu_check.write_report(report, tmp_path)
    again = gpu_check.read_report(tmp_path / "report.json")
    assert again == json.loads(json.dumps(report, default=str))
    assert again["peak_flops"] == 989e12 and again["steps"][5]["error_tail"] == "health did not answer | in time"
    markdown = (tmp_path / "report.md").read_text()
    assert gpu_check.steps_from_markdown(markdown) == {r.name: r.status for r in results}
    assert "| MFU, 125m pretraining in bf16 | >= 40% | 43.0% | yes |" in markdown
    assert "NVIDIA H200" in markdown and "989 TFLOP/s" in markdown and "health did not answer | in time" in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # no temp file left behind


def test_a_rerun_of_some_steps_keeps_the_other_results_of_the_last_run(tmp_path):
    args = gpu_check.build_parser().parse_args(["--out", str(tmp_path)])
    args.argv = []
    work = tmp_path / "work"
    report = gpu_check.new_report(args, _fixture_results(), work, None, 0.10)
    report["mode"] = "run"
    gpu_check.write_report(report, tmp_path)
    kept = gpu_check.carried_over(tmp_path, work, ["serve-w4a16", "bench"])
    assert [r.name for r in kept] == ["vllm", "pretrain", "quantize", "serve-bf16", "serve-fp8_dynamic"]  # the fixture's order
    assert kept[1].metrics == {"mfu": 0.43, "tokens_per_s": 6.1e5}
    assert gpu_check.carried_over(tmp_path, tmp_path / "other-work", ["bench"]) == []  # another work directory: nothing carried


def test_read_report_names_the_bad_step_and_the_rule(tmp_path):
    path = tmp_path / "report.json"
    _write_json(path, {"schema": gpu_check.REPORT_SCHEMA, "mode": "run", "budget_s": 720, "summary": [], "steps": [{"name": "pretrain", "status": "done"}]})
    with pytest.raises(ValueError, match=r"steps\[0\] \(pretrain\) status 'done' is not one of planned, ok, failed, timeout, skipped"):
        gpu_check.read_report(path)


def test_a_failing_command_is_recorded_with_its_exit_code_and_output_tail(tmp_path):
    cmds = [gpu_check.Command(["bash", "-c", "echo first"], tmp_path), gpu_check.Command(["bash", "-c", "echo broke >&2; exit 3"], tmp_path), gpu_check.Command(["touch", "never"], tmp_path)]
    result = gpu_check.StepResult("data", "data", [], 30)
    gpu_check.execute(gpu_check.Step("data", "data", cmds), result, tmp_path, 30)
    assert (result.status, result.returncode) == ("failed", 3)
    assert "first" in result.error_tail and "broke" in result.error_tail
    assert not (tmp_path / "never").exists()  # the step stops at its first failing command


def test_a_step_past_its_limit_is_killed_and_marked_timeout(tmp_path):
    result = gpu_check.StepResult("bench", "bench", [], 1)
    start = time.monotonic()
    gpu_check.execute(gpu_check.Step("bench", "bench", [gpu_check.Command(["sleep", "60"], tmp_path)]), result, tmp_path, 1.0)
    assert result.status == "timeout" and result.returncode is None
    assert time.monotonic() - start < 30 and "killed after 1 s" in result.error_tail


def test_a_real_run_without_a_gpu_fails_fast_naming_the_missing_gpu(tmp_path):
    start = time.monotonic()
    # --budget-s 0: where a GPU is visible after all, every step is skipped at once instead of a 12-minute run.
    run = subprocess.run([str(SCRIPT), "--out", str(tmp_path / "out"), "--budget-s", "0"], capture_output=True, text=True, timeout=120)
    if run.returncode != 2 and "steps within" in run.stdout:
        pytest.skip("a CUDA GPU is visible to this Python: the no-GPU path cannot be shown here")
    assert run.returncode == 2
    assert "no NVIDIA GPU" in run.stderr and "torch.cuda.is_available() is False" in run.stderr and "--dry-run" in run.stderr
    assert time.monotonic() - start < 60  # the probe only (a torch import), not a 12-minute run
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
