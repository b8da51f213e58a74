"""Calibrate the drift monitor's thresholds: every check's score on batches of new in-domain Python code, of prose and of
other programming languages, checked against a reference built the way `make run` builds it.

Reference (in --workdir, reused when it is already there): the default pipeline's data path on the running
interpreter's standard library (ingest -> validate -> dedup -> tokenize with params.yaml's settings), then pretrain
with params.yaml's preset and token budget (or --pretrain-tokens); the monitor scores perplexity with that model.

Batches (--docs files each, picked by a hash of the path, files over 200 kB left out):
- in-domain: the stdlib .py files of the other Python versions pyenv keeps (~/.pyenv/versions/*) that differ from
  the training version's file of the same name; .py files of this project's .venv site-packages (all packages, and
  pip alone; pip also as its whole directory, size limit off); tokenize's own held-out split;
- prose: .md/.rst/README/LICENSE files in site-packages, and /usr/share/doc/*/copyright;
- other language: C headers (/usr/include), JavaScript (/usr/lib/node_modules).

    .venv/bin/python benchmarks/bench_monitor_calibration.py                 # ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_monitor_calibration.py --docs 100 --workdir /tmp/llmops-calibration

Prints one row per batch with every check's score and the thresholds in params.yaml's `monitor` section, then, per
check, the highest in-domain score and the lowest shifted score (the margin a threshold has to sit in). Writes
benchmarks/results/monitor_calibration.json (gitignored). The checks are not tracked (track=False).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

from _setup import RESULTS, ROOT  # noqa: E402  (repo on sys.path, offline environment, no progress bars)

import yaml  # noqa: E402

from llmops.data.sources import stdlib_root  # noqa: E402
from llmops.monitoring import drift  # noqa: E402
from llmops.params.load import load_params  # noqa: E402

MAX_FILE_BYTES = 200_000
SITE_PACKAGES = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
IN_DOMAIN, PROSE, OTHER = "in-domain", "prose", "other-language"
DATA_CHECKS = ("token_length_ks", "unigram_js", "oov_rate_increase", "validation_pass_rate", "near_duplicate_share", "perplexity_ratio")


def build_reference(root: Path, pretrain_tokens: int, perplexity_tokens: int) -> None:
    """The default data path on this interpreter's stdlib, then pretrain, under `root`; a stage whose output is
    already there is not run again."""
    from tasks import dedup, ingest, pretrain, tokenize, validate

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["monitor"].update(model="models/pretrain", perplexity_tokens=perplexity_tokens or raw["monitor"]["perplexity_tokens"])
    raw["ingest"]["source"] = ""  # the stdlib of the running interpreter, as `make run`
    raw["pretrain"]["token_budget"] = pretrain_tokens or raw["pretrain"]["token_budget"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(root / "params.yaml")
    for name, step, done in (
        ("ingest", lambda: ingest.run(params.ingest, params.paths), params.paths.raw),
        ("validate", lambda: validate.run(params.validate_, params.paths), params.paths.validated),
        ("dedup", lambda: dedup.run(params.dedup, params.paths), params.paths.dedup),
        ("tokenize", lambda: tokenize.run(params.tokenize, params.model, params.paths), params.paths.tokens / "reference_stats.json"),
        ("pretrain", lambda: pretrain.run(params.pretrain, params.train, params.model, params.paths), params.paths.pretrain_model / "config.json"),
    ):
        if done.exists():
            print(f"reference: {name} already in {done}", flush=True)
            continue
        started = time.perf_counter()
        result = step()
        print(f"reference: {name} {time.perf_counter() - started:.0f} s: {result.summary}", flush=True)


def pick(files: list[Path], n: int) -> list[Path]:
    """`n` files by a hash of their path (stable across runs), none larger than MAX_FILE_BYTES or empty."""
    usable = [f for f in files if f.is_file() and 0 < f.stat().st_size <= MAX_FILE_BYTES]
    return sorted(usable, key=lambda p: hashlib.sha256(str(p).encode()).digest())[:n]


def other_stdlib(version_dir: Path) -> list[Path]:
    """A pyenv version's stdlib .py files that differ from the training interpreter's file of the same relative path."""
    lib = next(version_dir.glob("lib/python[23].*"), None)
    if lib is None:
        return []
    training = stdlib_root()
    out = []
    for f in sorted(lib.rglob("*.py")):
        if "site-packages" in f.parts:
            continue
        same = training / f.relative_to(lib)
        if not (same.is_file() and same.read_bytes() == f.read_bytes()):
            out.append(f)
    return out


def batch_sources(docs: int) -> list[tuple[str, str, list[Path]]]:
    """(kind, name, files) of every batch that has enough files on this machine."""
    batches: list[tuple[str, str, list[Path]]] = []
    training_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for version in sorted((Path.home() / ".pyenv" / "versions").glob("*")):
        if not version.name.startswith(training_version):
            batches.append((IN_DOMAIN, f"stdlib {version.name}", pick(other_stdlib(version), docs)))
    site_py = [f for f in SITE_PACKAGES.rglob("*.py")]
    batches.append((IN_DOMAIN, "site-packages .py", pick(site_py, docs)))
    batches.append((IN_DOMAIN, "site-packages .py (2nd)", pick(site_py, 2 * docs)[docs:]))
    batches.append((IN_DOMAIN, "site-packages/pip .py", pick(list((SITE_PACKAGES / "pip").rglob("*.py")), docs)))
    named = [f for f in SITE_PACKAGES.rglob("*") if f.suffix in (".md", ".rst") or f.name.split(".")[0] in ("README", "LICENSE", "COPYING")]
    prose = [f for f in named if f.stat().st_size > 500 and f.suffix not in (".py", ".pyc", ".so")]
    batches.append((PROSE, "site-packages docs (md/rst/README/LICENSE)", pick(prose, docs)))
    batches.append((PROSE, "site-packages docs (2nd)", pick(prose, 2 * docs)[docs:]))
    batches.append((PROSE, "/usr/share/doc copyright", pick(list(Path("/usr/share/doc").glob("*/copyright")), docs)))
    headers = list(Path("/usr/include").rglob("*.h"))
    batches.append((OTHER, "C headers /usr/include", pick(headers, docs)))
    batches.append((OTHER, "C headers (2nd)", pick(headers, 2 * docs)[docs:]))
    scripts = list(Path("/usr/lib/node_modules").rglob("*.js"))
    batches.append((OTHER, "JavaScript node_modules", pick(scripts, docs)))
    batches.append((OTHER, "JavaScript (2nd)", pick(scripts, 2 * docs)[docs:]))
    return [(kind, name, files) for kind, name, files in batches if len(files) >= min(docs, 50)]


def write_batch(path: Path, files: list[Path]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for file in files:
            f.write(json.dumps({"id": str(file), "text": file.read_text(errors="replace")}) + "\n")
    return path


def fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=200, help="files per batch")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmops-monitor-calibration"), help="reference project (built once, reused)")
    parser.add_argument("--pretrain-tokens", type=int, default=0, help="pretrain.token_budget of the reference model (0 = params.yaml's)")
    parser.add_argument("--perplexity-tokens", type=int, default=0, help="monitor.perplexity_tokens (0 = params.yaml's)")
    args = parser.parse_args()
    build_reference(args.workdir, args.pretrain_tokens, args.perplexity_tokens)
    params = load_params(args.workdir / "params.yaml")
    heldout = drift.export_heldout(params)
    batches = [(IN_DOMAIN, "held-out split (tokenize)", heldout)]
    for kind, name, files in batch_sources(args.docs):
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        batches.append((kind, name, write_batch(args.workdir / "batches" / f"{slug}.jsonl", files)))
    # every file of pip, large vendored tables included, given as a directory (read with ingest.file_glob)
    batches.insert(len([b for b in batches if b[0] == IN_DOMAIN]), (IN_DOMAIN, "site-packages/pip (whole directory)", SITE_PACKAGES / "pip"))
    rows = []
    for kind, name, path in batches:
        started = time.perf_counter()
        result = drift.run(params, str(path), track=False)
        scores = {c.name: (None if math.isnan(c.score) else c.score) for c in result.checks if c.name in DATA_CHECKS}
        flagged = [c.name for c in result.checks if c.flagged]
        rows.append({"kind": kind, "batch": name, "docs": result.info["docs"], "scores": scores, "flagged": flagged})
        print(f"{kind:15} {name:45} {result.info['docs']:4} docs {time.perf_counter() - started:5.0f} s  flagged: {', '.join(flagged) or '-'}", flush=True)
    checks = {c.name: (c.threshold, c.kind) for c in result.checks if c.name in DATA_CHECKS}
    print("\n| kind | batch | docs | " + " | ".join(checks) + " | verdict |")
    print("|---|---|---|" + "---|" * len(checks) + "---|")
    print("| | **threshold** | | " + " | ".join(("<= " if k == "max" else ">= ") + str(t) for t, k in checks.values()) + " | |")
    for r in rows:
        cells = " | ".join(fmt(r["scores"][n]) + ("*" if n in r["flagged"] else "") for n in checks)
        print(f"| {r['kind']} | {r['batch']} | {r['docs']} | {cells} | {'DRIFT' if r['flagged'] else 'ok'} |")
    print("\n(* flagged by the threshold in params.yaml)\n\n| check | worst in-domain | best-looking shifted | threshold |\n|---|---|---|---|")
    margins = {}
    for name, (threshold, kind) in checks.items():
        pick_worst = max if kind == "max" else min
        inside = [r["scores"][name] for r in rows if r["kind"] == IN_DOMAIN and r["scores"][name] is not None]
        shifted = [r["scores"][name] for r in rows if r["kind"] != IN_DOMAIN and r["scores"][name] is not None]
        worst_in = pick_worst(inside) if inside else None
        best_shifted = (min if kind == "max" else max)(shifted) if shifted else None
        margins[name] = {"worst_in_domain": worst_in, "best_looking_shifted": best_shifted, "threshold": threshold, "kind": kind}
        print(f"| {name} | {fmt(worst_in)} | {fmt(best_shifted)} | {'<=' if kind == 'max' else '>='} {threshold} |")
    missed = [r["batch"] for r in rows if r["kind"] != IN_DOMAIN and not r["flagged"]]
    false_alarms = [r["batch"] for r in rows if r["kind"] == IN_DOMAIN and r["flagged"]]
    print(f"\nin-domain batches flagged: {false_alarms or 'none'}; shifted batches not flagged: {missed or 'none'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"docs_per_batch": args.docs, "pretrain_tokens": params.pretrain.token_budget, "perplexity_tokens": params.monitor.perplexity_tokens, "reference": str(args.workdir), "rows": rows, "margins": margins, "false_alarms": false_alarms, "missed": missed}
    (RESULTS / "monitor_calibration.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
