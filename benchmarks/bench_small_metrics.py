"""Scores that move at small scale, for the models of a finished pipeline run: base (pretrain) vs fine-tuned vs aligned
(vs the distilled student where there is one).

For each model in PROJECT/models/{pretrain,finetune,aligned,student}: held-out perplexity, and with the evaluate
stage's own functions and PROJECT's evaluate params: the NLL of HumanEval's canonical solutions given their prompts
(bits per token and per byte), the syntax-valid rate and pass@1 of its greedy HumanEval bodies, and the doctest pass
/ solved rate on the held-out doctest prompts (finetune's held-out source files of PROJECT's corpus, scored in the
sandbox). PROJECT is only read; nothing is written under it.

    .venv/bin/python benchmarks/bench_small_metrics.py [--project /tmp/run2]

Prints a markdown table (and the seconds each new score adds per model) and writes benchmarks/results/small_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from _setup import RESULTS  # repo on sys.path, offline environment, no progress bars

from llmops.params.load import load_params

MODELS = {"base (pretrain)": "pretrain_model", "fine-tuned": "finetune_model", "aligned": "aligned_model", "student (distill)": "student_model"}


def score(model_dir: Path, params, prompts, isolated: bool) -> dict[str, float]:
    from llmops.evaluation.generation import load_model
    from llmops.evaluation.suite import held_out_perplexity, humaneval
    from tasks.evaluate import doctest_metrics

    cfg = params.evaluate
    out: dict[str, float] = {"perplexity": held_out_perplexity(model_dir, params.paths.tokens, cfg, "perplexity")["perplexity"]}
    model, tokenizer = load_model(model_dir)
    started = time.perf_counter()
    he, _ = humaneval(model, tokenizer, cfg)
    out["humaneval_seconds"] = time.perf_counter() - started
    out |= {key: he[key] for key in ("nll_bits_per_token", "nll_bits_per_byte", "nll_tokens", "nll_truncated", "syntax_valid_rate", "pass_at_1")}
    started = time.perf_counter()
    doctest, _ = doctest_metrics(model, tokenizer, prompts, cfg, isolated, model_dir.name)
    out["doctest_seconds"] = time.perf_counter() - started
    out |= {f"doctest_{key}": value for key, value in doctest.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("/tmp/run2"), help="a finished `make run` (read only)")
    args = parser.parse_args()

    from llmops.evaluation.suite import sandbox_mode
    from tasks.evaluate import heldout_doctest_prompts

    params = load_params(args.project / "params.yaml")
    cfg = params.evaluate
    isolated = sandbox_mode(cfg)
    started = time.perf_counter()
    prompts, counts = heldout_doctest_prompts(cfg, params.finetune, params.train.seed, params.paths.dedup, isolated)
    mining_s = time.perf_counter() - started
    results = {}
    for label, key in MODELS.items():
        model_dir = getattr(params.paths, key)
        if (model_dir / "config.json").is_file():
            results[label] = score(model_dir, params, prompts, isolated)

    def cell(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    print(f"\nproject {args.project}; HumanEval: first {cfg.max_problems} problems, greedy, max_new_tokens {cfg.max_new_tokens}; "
          f"held-out doctest prompts: {len(prompts)} (counts {counts}), up to {cfg.doctest_examples} examples each\n")
    print("| model | held-out perplexity | HumanEval solution NLL (bits/token) | (bits/byte) | HumanEval syntax-valid | pass@1 | doctest pass rate | doctest solved | doctest syntax-valid |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['perplexity']:.1f} | {r['nll_bits_per_token']:.3f} | {r['nll_bits_per_byte']:.3f} | {r['syntax_valid_rate']:.2f} | "
            f"{r['pass_at_1']:.2f} | {cell(r['doctest_pass_rate'])} | {cell(r['doctest_solved_rate'])} | {cell(r['doctest_syntax_valid_rate'], 2)} |"
        )
    print(f"\nseconds: mining + checking the held-out doctest prompts {mining_s:.1f} (once per evaluate run); per model: "
          + "; ".join(f"{label}: HumanEval (with NLL) {r['humaneval_seconds']:.1f}, doctests {r['doctest_seconds']:.1f}" for label, r in results.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"project": str(args.project), "host": platform.node(), "doctest_prompts": len(prompts), "doctest_counts": counts,
              "doctest_mining_seconds": mining_s, "models": results}  # fmt: skip
    (RESULTS / "small_metrics.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
