"""Time from a drifted batch to a retrained, gated, served model, on the real stack, against the same retrain and
roll-out done by hand, measured in the same run.

Both sides start from identical tiny-corpus checkouts (tests/helpers.make_repo) already run to `tokenize`, with the
project's default model and training settings (`tiny` preset, pretrain/finetune/evaluate/quantize sections of
params.yaml; --token-budget overrides pretrain.token_budget), tracked on one PostgreSQL-backed `mlflow server`:

  drift     `prefect deployment run monitor/monitor` on a batch of English prose, run by a process worker: the check
            flags it, the batch becomes a DVC-versioned training source, `pipeline/pipeline` runs through
            run_deployment, register gates the new model and emits llmops.champion.changed, the `deploy` deployment's
            trigger serves, smoke- and load-tests it and moves `production` (tests/integration/drift.py)
  by hand   `llmops run --set ingest.source=[corpus, batch] --no-monitor` in the other checkout: the same stages,
            then the same deploy flow at the end of the run (ephemeral Prefect, its own registered model name)

Run from the repository root, with PostgreSQL at $LLMOPS_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test):

    .venv/bin/python benchmarks/bench_drift_to_serve.py                       # params.yaml's token budget (400k)
    .venv/bin/python benchmarks/bench_drift_to_serve.py --token-budget 100000

Prints a markdown table and writes benchmarks/results/drift_to_serve.json (gitignored).
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

from tests.helpers import BIN, sh, stop_process_tree  # noqa: E402
from tests.integration.drift import drift_to_production, retrain_repo, write_batch  # noqa: E402
from tests.integration.servers import postgres_unreachable, postgres_url, running_stack  # noqa: E402
from tests.monitor.conftest import PROSE  # noqa: E402

BATCH = "incoming/prose.jsonl"
TIMEOUT_S = 3600
DEFAULT_SECTIONS = ("pretrain", "finetune", "evaluate", "quantize")


def tiny_default(token_budget: int | None, model_name: str):
    """params.yaml edits: the project's own training and evaluation settings instead of the tests' micro ones."""
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())

    def edit(params: dict) -> None:
        for section in DEFAULT_SECTIONS:
            params[section] = defaults[section]
        if token_budget:
            params["pretrain"]["token_budget"] = token_budget
        params["register"]["model_name"] = model_name

    return edit


def stage_work(repo: Path) -> dict[str, object]:
    """What each side's retrain did (both must have done the same work for the times to compare)."""
    metrics = {stage: json.loads((repo / "metrics" / f"{stage}.json").read_text()) for stage in ("ingest", "pretrain", "finetune", "eval", "register")}
    return {
        "docs": metrics["ingest"]["docs"],
        "pretrain_steps": metrics["pretrain"]["steps"],
        "pretrain_tokens": metrics["pretrain"]["tokens"],
        "pretrain_train_s": round(metrics["pretrain"]["train_seconds"], 1),
        "finetune_steps": metrics["finetune"]["steps"],
        "humaneval_problems": metrics["eval"].get("humaneval", {}).get("problems", 0),
        "gate": metrics["register"]["decision"],
    }


def by_hand(stack, repo: Path) -> float:
    """The same retrain and roll-out as one `llmops run`: Prefect ephemeral (the server's deploy trigger stays out of it)."""
    sources = [yaml.safe_load((repo / "params.yaml").read_text())["ingest"]["source"], BATCH]
    env = {k: v for k, v in stack.env.items() if k != "PREFECT_API_URL"}
    started = time.perf_counter()
    sh(BIN / "llmops", "run", "--no-monitor", "--set", f"ingest.source={json.dumps(sources)}", cwd=repo, env=env, timeout=TIMEOUT_S)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--token-budget", type=int, default=None, help="pretrain.token_budget (default: params.yaml's)")
    args = parser.parse_args()
    url = postgres_url()
    if reason := postgres_unreachable(url):
        raise SystemExit(f"this benchmark needs PostgreSQL at {url}: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        root = Path(tmp)
        for name in ("servers", "drift", "hand"):
            (root / name).mkdir()
        with running_stack(root / "servers", url) as stack:
            hand = retrain_repo(stack, root / "hand", tiny_default(args.token_budget, "bench-by-hand"), deployments=False)
            drift = retrain_repo(stack, root / "drift", tiny_default(args.token_budget, "bench-drift"))
            for repo in (hand, drift):
                write_batch(repo / BATCH, PROSE)
            hand_s = by_hand(stack, hand)
            print(f"by hand: {hand_s:.1f} s", flush=True)
            worker = stack.start_worker(drift)
            try:
                rollout = drift_to_production(stack, drift, BATCH, worker, TIMEOUT_S)
            finally:
                stop_process_tree(worker.proc)
            budget = yaml.safe_load((drift / "params.yaml").read_text())["pretrain"]["token_budget"]
            work = {side: stage_work(repo) for side, repo in (("drift", drift), ("by_hand", hand))}
    seconds = rollout.seconds
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "token_budget": budget,
        "drift": seconds,
        "drift_deploy_state": rollout.deploy["state_type"],
        "by_hand_s": hand_s,
        "ratio_drift_over_by_hand": seconds["total"] / hand_s,
        "work": work,
    }
    print(f"\n| tiny preset, {budget:,} tokens | check | retrain + gate | event → roll-out starts | roll-out | drift → served | by hand (llmops run) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| seconds | {seconds['check']:.1f} | {seconds['retrain_and_gate']:.1f} | {seconds['event_to_rollout']:.1f} | {seconds['rollout']:.1f} | "
          f"{seconds['total']:.1f} | {hand_s:.1f} | {seconds['total'] / hand_s:.2f}x |")
    for side, done in work.items():
        print(f"{side}: {json.dumps(done)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift_to_serve.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
