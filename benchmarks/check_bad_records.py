"""Bad records in a big JSONL corpus are quarantined with file:line exactly as in a small one, with bounded memory.

Writes one JSONL file of `--gb` GB (default 1): the standard library's .py files as records, repeated with distinct
ids, with `--bad` bad lines planted at spread-out line numbers, cycling through four kinds:

  malformed   a line that is not JSON                       -> ingest flags it (`malformed JSON ... line N`)
  no-text     an object without the text field              -> ingest flags it (`no string field 'text'`)
  nul         text holding NUL characters                   -> validate's NUL rule
  binary      text that is mostly punctuation/control bytes -> validate's alnum / control-character rules

then runs ingest and validate (`tasks.<stage>.run`, the call `llmops stage NAME --no-track` makes) on it with
params.yaml's settings, and checks that every planted line, and no other, is in data/quarantine with its
`<file>:<line>` source and a reason, that `in = validated + quarantined`, and prints each stage's peak RSS of the
process (ru_maxrss of a child process per stage).

    .venv/bin/python benchmarks/check_bad_records.py --gb 1 --bad 40
"""

from __future__ import annotations

import _setup  # noqa: F401  (repository on sys.path, offline environment)

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("malformed", "no-text", "nul", "binary")


def bad_line(kind: str, n: int) -> str:
    if kind == "malformed":
        return '{"id": "broken-%d", "text": "def f(:' % n
    if kind == "no-text":
        return json.dumps({"id": f"notext-{n}", "body": "x = 1"})
    if kind == "nul":
        return json.dumps({"id": f"nul-{n}", "text": "x = 1\x00\x00\x00\n" * 20})
    return json.dumps({"id": f"binary-{n}", "text": "\x01\x02#$%^&*(){}[]" * 200})


def write_corpus(path: Path, target_bytes: int, bad: int) -> tuple[dict[int, str], int]:
    """The corpus; returns {planted line number (1-based): kind} and the number of lines."""
    from llmops.data.sources import resolve_sources

    texts = [p.read_text(encoding="utf-8", errors="replace") for _, _, p in resolve_sources("", "**/*.py", Path("/nonexistent"))]
    good_lines_per_bad = max(1, int(target_bytes / (sum(map(len, texts)) / len(texts)) / max(bad, 1)))
    planted: dict[int, str] = {}
    written, line, copy = 0, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            for i, text in enumerate(texts):
                line += 1
                if len(planted) < bad and line % good_lines_per_bad == 0:
                    kind = KINDS[len(planted) % len(KINDS)]
                    planted[line] = kind
                    f.write(bad_line(kind, line) + "\n")
                    line += 1
                record = json.dumps({"id": f"copy{copy}/{i}", "text": text})
                f.write(record + "\n")
                written += len(record) + 1
                if written >= target_bytes:
                    break
            copy += 1
    return planted, line


def _stage(name: str, root: str, corpus: str, queue: mp.Queue) -> None:
    from llmops.params.load import load_params
    from tasks import ingest, validate

    params = load_params(_setup.ROOT / "params.yaml")
    paths = params.paths.model_copy(update={k: Path(root) / k for k in ("raw", "validated", "quarantine", "reports")})
    started = time.perf_counter()
    if name == "ingest":
        result = ingest.run(params.section("ingest").model_copy(update={"source": corpus}), paths)
    else:
        result = validate.run(params.section("validate").model_copy(update={"min_pass_rate": 0.0}), paths)
    seconds = time.perf_counter() - started
    queue.put({"metrics": result.metrics, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_stage(name: str, root: Path, corpus: Path) -> dict:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_stage, args=(name, str(root), str(corpus), queue))
    proc.start()
    while True:
        try:
            out = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: still running, or dead without a result
            if not proc.is_alive():
                raise SystemExit(f"{name} exited {proc.exitcode} without a result") from None
    proc.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--bad", type=int, default=40)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    from llmops.common.io import read_records

    with tempfile.TemporaryDirectory(prefix="bad-records-", dir=args.work) as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        planted, lines = write_corpus(corpus, int(args.gb * 1e9), args.bad)
        print(f"{corpus.stat().st_size / 1e9:.2f} GB, {lines:,} lines, {len(planted)} bad lines planted", flush=True)
        stats = {name: run_stage(name, root, corpus) for name in ("ingest", "validate")}
        for name, s in stats.items():
            print(f"{name}: {s['seconds']:.0f} s, peak RSS {s['peak_rss_mb']:.0f} MB", flush=True)
        quarantine = read_records(root / "quarantine").select(["source", "failed_expectations"]).to_pylist()
        found = {int(r["source"].rsplit(":", 1)[1]): r["failed_expectations"] for r in quarantine if r["source"].rsplit(":", 1)[0].endswith("/" + corpus.name)}
        missing = sorted(set(planted) - set(found))
        extra = sorted(set(found) - set(planted))
        validate = stats["validate"]["metrics"]
        balanced = validate["docs_in"] == validate["docs_out"] + validate["quarantined"]
        by_kind = {kind: sorted({r for line, k in planted.items() if k == kind and line in found for r in json.loads(found[line])}) for kind in KINDS}
        print(json.dumps({"planted": len(planted), "quarantined_planted": len(planted) - len(missing), "missing_lines": missing[:10],
                          "unexpected_lines": extra[:10], "in_equals_out_plus_quarantined": balanced, "reasons_by_kind": by_kind}, indent=1))
        if missing or not balanced:
            sys.exit(1)


if __name__ == "__main__":
    main()
