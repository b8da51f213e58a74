"""The quantization table: each variant (and the unquantized model) scored with the evaluate stage's functions and
measured for size, load memory and CPU latency, its deltas against the unquantized row, and the table as Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmops.params.evaluate import EvaluateConfig
from llmops.params.quantize import QuantizeConfig
from llmops.quantization import measure

BASELINE = "unquantized"


def score(name: str, model_dir: Path, cfg: QuantizeConfig, evaluate: EvaluateConfig, tokens: Path, prompt: list[int]) -> dict[str, Any]:
    """The evaluate stage's held-out perplexity and HumanEval pass@1, then the footprint measured in a fresh process."""
    from llmops.evaluation.generation import load_model
    from llmops.evaluation.suite import held_out_perplexity, humaneval

    row: dict[str, Any] = {"scheme": name}
    ppl = held_out_perplexity(model_dir, tokens, evaluate, f"quantize: perplexity ({name})")
    row.update(perplexity=ppl["perplexity"], loss=ppl["loss"])
    if cfg.humaneval and evaluate.max_problems:
        model, tokenizer = load_model(model_dir)
        he, _ = humaneval(model, tokenizer, evaluate)
        row["pass_at_1"] = he["pass_at_1"]
        del model  # not resident while the footprint child runs
    footprint = measure.measure_in_child(model_dir, prompt, cfg.latency_new_tokens, cfg.latency_repeats)
    row.update(size_mb=measure.disk_mb(model_dir), load_mb=footprint.load_mb, peak_rss_mb=footprint.peak_rss_mb,
               weights_mb=footprint.weights_mb, ms_per_token=footprint.ms_per_token, threads=footprint.threads)
    return row


def compare(row: dict[str, Any], base: dict[str, Any], cfg: QuantizeConfig) -> dict[str, Any]:
    """A variant's row with its deltas and ratios against the unquantized row (ratios > 1 are gains)."""
    increase = row["perplexity"] / base["perplexity"] - 1
    out = {
        **row,
        "perplexity_increase": increase,
        "within_tolerance": increase <= cfg.max_perplexity_increase,
        "size_ratio": base["size_mb"] / row["size_mb"],
        "memory_ratio": base["load_mb"] / row["load_mb"] if row["load_mb"] > 0 else None,  # growth can read 0 on a tiny model
        "speedup": base["ms_per_token"] / row["ms_per_token"],
    }
    if "pass_at_1" in row:
        out["pass_at_1_delta"] = row["pass_at_1"] - base["pass_at_1"]
    return out


def markdown_table(rows: list[dict[str, Any]], notes: list[str]) -> str:
    def num(row: dict[str, Any], key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, fmt)

    lines = [
        "| scheme | perplexity | Δ perplexity | pass@1 | Δ pass@1 | size MB | smaller | load MB | less memory | ms/token | speed-up | within tolerance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        variant = row["scheme"] != BASELINE
        lines.append(" | ".join([
            f"| {row['scheme']}", num(row, "perplexity", ".3f"),
            f"{row['perplexity_increase']:+.2%}" if variant else "-", num(row, "pass_at_1", ".3f"),
            num(row, "pass_at_1_delta", "+.3f") if variant else "-", num(row, "size_mb", ".2f"),
            f"{row['size_ratio']:.2f}x" if variant else "-", num(row, "load_mb", ".1f"),
            f"{num(row, 'memory_ratio', '.2f')}x" if variant else "-", num(row, "ms_per_token", ".2f"),
            f"{row['speedup']:.2f}x" if variant else "-", ("yes" if row["within_tolerance"] else "NO") if variant else "-",
        ]) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"
