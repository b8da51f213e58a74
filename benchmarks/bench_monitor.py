"""Drift monitor throughput: wall time and MB/s of `llmops.monitoring.drift.run` on a ~10 MB batch, against ingest + tokenize of
the same batch (the least any check of new data must do: read it and tokenize it) measured in the same run.

Set-up, in a temporary directory: a reference project from part of the stdlib (data/dedup written directly,
then the real tokenize stage: BPE, reference_stats.json) and a randomly initialised `tiny` preset model saved
with that tokenizer, so the perplexity check runs at its default token budget (monitor.perplexity_tokens).
The batch is other stdlib .py files, concatenated into one JSONL until it reaches --batch-mb.

    .venv/bin/python benchmarks/bench_monitor.py              # ~10 MB batch
    .venv/bin/python benchmarks/bench_monitor.py --batch-mb 2

Two timed runs after a warm-up: the first batch checked against a model (the held-out split's perplexity is scored
too) and a later one (it is reused from monitor.workdir/heldout_perplexity/). Prints a table and writes
benchmarks/results/monitor.json (gitignored). Not tracked to MLflow (track=False), so the numbers are the checks alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from _setup import RESULTS, ROOT  # noqa: E402  (repo on sys.path, offline environment, no progress bars)

import pyarrow as pa  # noqa: E402
import yaml  # noqa: E402

from tasks import ingest, tokenize  # noqa: E402
from llmops.common.io import RECORD_SCHEMA, read_records, write_records  # noqa: E402
from llmops.data.sources import stdlib_root  # noqa: E402
from llmops.data.tokenizer import encode_and_pack  # noqa: E402
from llmops.monitoring import drift  # noqa: E402
from llmops.params.load import load_params  # noqa: E402

REFERENCE_PACKAGES = ("email", "json", "http", "logging", "importlib", "xml", "urllib", "concurrent")


def build_project(root: Path, batch_mb: float) -> tuple[Path, float]:
    """Reference project + batch file; returns (batch path, batch MB)."""
    stdlib = stdlib_root()
    files = [p for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts and "test" not in p.parts]
    reference = [p for p in files if p.relative_to(stdlib).parts[0] in REFERENCE_PACKAGES]
    rows = [{"id": str(p.relative_to(stdlib)), "text": p.read_text(errors="replace"), "source": "stdlib", "meta": "{}", "ingest_error": None} for p in reference]
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["monitor"]["model"] = "models/tiny"
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(root / "params.yaml")  # params.paths.* resolved under root
    write_records(params.paths.dedup, pa.Table.from_pylist(rows, schema=RECORD_SCHEMA), shard_max_bytes=16_000_000)
    tokenize.run(params.tokenize, params.model, params.paths)
    save_random_model(params, root)
    batch, size = root / "incoming" / "batch.jsonl", 0
    batch.parent.mkdir()
    with open(batch, "w") as f:
        for p in (p for p in files if p not in reference):
            text = p.read_text(errors="replace")
            f.write(json.dumps({"id": str(p.relative_to(stdlib)), "text": text}) + "\n")
            size += len(text.encode())
            if size >= batch_mb * 1e6:
                break
    return batch, size / 1e6


def save_random_model(params, root: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(params.paths.tokenizer))
    preset = dict(params.pretrain.presets["tiny"])
    config = AutoConfig.for_model(preset.pop("model_type"), vocab_size=len(tokenizer), max_position_embeddings=params.pretrain.seq_len, **preset)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "models" / "tiny")
    tokenizer.save_pretrained(root / "models" / "tiny")


def baseline(params, root: Path, batch: Path) -> float:
    """ingest + tokenize (encode and pack with the training tokenizer) of the batch, nothing else."""
    from transformers import AutoTokenizer

    paths = params.paths.model_copy(update={"raw": root / "baseline_raw"})
    started = time.perf_counter()
    ingest.run(params.ingest.model_copy(update={"source": str(batch)}), paths)
    texts = [t for t in read_records(paths.raw).column("text").to_pylist() if t]
    tokenizer = AutoTokenizer.from_pretrained(str(params.paths.tokenizer))
    encode_and_pack(tokenizer, texts, params.tokenize.batch_docs, "baseline")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-mb", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        batch, mb = build_project(root, args.batch_mb)
        params = load_params(root / "params.yaml")
        drift.run(params, str(batch), track=False)  # warm-up: imports (GX ~6 s), page cache
        base_s = baseline(params, root, batch)
        timed = {}
        for case in ("first", "later"):
            if case == "first":  # the first batch checked against this model also scores the held-out split
                shutil.rmtree(params.paths.root / params.monitor.workdir / "heldout_perplexity")
            started = time.perf_counter()
            result = drift.run(params, str(batch), track=False)
            timed[case] = (time.perf_counter() - started, result)
    out = {
        "batch_mb": mb,
        "docs": result.info["docs"],
        "baseline_ingest_tokenize_s": base_s,
        "baseline_mb_per_s": mb / base_s,
        "drift": result.drift,
        "scores": {c.name: c.score for c in result.checks},
        "cpus": os.cpu_count(),
    }
    for case, (seconds, res) in timed.items():
        out[case] = {
            "monitor_s": seconds,
            "monitor_mb_per_s": mb / seconds,
            "ratio_monitor_over_baseline": seconds / base_s,
            "heldout_perplexity_reused": res.info["heldout_perplexity_reused"],
            "seconds_by_part": {k[len("seconds_") :]: v for k, v in res.info.items() if k.startswith("seconds_")},
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitor.json").write_text(json.dumps(out, indent=2) + "\n")
    print("| batch | docs | held-out perplexity | monitor | MB/s | ingest+tokenize | MB/s | monitor / baseline |\n|---|---|---|---|---|---|---|---|")
    for case, label in (("first", "scored (first batch for this model)"), ("later", "reused (later batches)")):
        r = out[case]
        print(f"| {mb:.1f} MB | {out['docs']} | {label} | {r['monitor_s']:.1f} s | {r['monitor_mb_per_s']:.2f} | {base_s:.1f} s | "
              f"{out['baseline_mb_per_s']:.2f} | {r['ratio_monitor_over_baseline']:.1f}x |")
    for case in timed:
        print(f"seconds by part ({case}):", json.dumps({k: round(v, 1) for k, v in out[case]["seconds_by_part"].items()}))
    print("scores:", json.dumps({k: round(v, 4) for k, v in out["scores"].items()}))


if __name__ == "__main__":
    main()
