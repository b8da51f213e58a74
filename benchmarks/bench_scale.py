"""How the data stages scale: wall time, MB/s and peak memory of ingest -> validate -> dedup -> tokenize from 31 MB to GBs.

Corpora (built once, cached under --work, default /tmp/llmops-scale):

  stdlib          the default corpus: ingest.source "" reads this interpreter's stdlib .py files (~31 MB)
  100mb, 300mb,   one JSONL file of real code, {"id": "<install>/<path>", "text": ...}: every .py file of every
  850mb           pyenv Python 3 install (~/.pyenv/versions/*/lib/python3*/, its site-packages included) and of
                  .venv's site-packages, in that order, nothing deduplicated (the same file in several versions is
                  a realistic duplicate), until that many MB of UTF-8 text; when the code runs out first the corpus
                  is capped there and the output says so (`capped`)
  synthetic-<N>gb --synthetic-gb N: the real code repeated until N GB of text; copy k > 0 has the id "copy<k>/<id>",
                  a few words swapped (first occurrence of 3 of SWAPS, chosen by k) and a "# copy k" line appended,
                  so copies are near duplicates, not exact ones

Each stage runs on the previous stage's output in a fresh subprocess (this file with --run-stage: load params,
`tasks.<stage>.run()`, the same call `llmops stage NAME --no-track` makes) on params.yaml as it was when the run
started, with every output under the work dir and validate.min_pass_rate=0.5 (real code has minified and generated
files that fail the line-length rule). Measured per stage:

  seconds   around run() inside the subprocess (interpreter start-up and imports excluded; a local Ray's start-up,
            which happens inside run(), included); MB/s is the stage's input UTF-8 text over it
  memory    every 0.2 s, psutil sums over the stage's whole process tree (pool workers included) and, under Ray,
            every process that carries this run's marker in its environment (raylet, gcs_server, workers, even
            re-parented ones) or, where the environment cannot be read, started after the stage and names ray in
            its command line. Peak summed PSS (memory_full_info().pss: shared pages split between the processes
            that map them) and peak summed RSS (counts a shared page once per process) are reported

--engine processes | ray | both (LLMOPS_DATA_ENGINE for the subprocess; under ray the stage process starts a local
Ray). With both, every stage runs on the process pool, then validate and dedup run again under Ray on the same
input, and the ray/processes ratios of seconds and peak memory are printed, along with whether the outputs are
byte-identical. Processes a Ray stage leaves behind are killed by pid before the next stage starts.

Run from the repository root (one at a time: the numbers are for a machine doing nothing else):

    .venv/bin/python benchmarks/bench_scale.py --corpora stdlib,100mb,300mb,850mb --engine processes
    .venv/bin/python benchmarks/bench_scale.py --corpora 300mb --engine both
    .venv/bin/python benchmarks/bench_scale.py --corpora none --synthetic-gb 5 --engine processes

`--stages` runs some of the stages: ingest,validate --keep leaves their outputs, and a later --stages dedup (with
--keep again, to go on) measures dedup alone on them.

Prints one markdown table per engine and merges its rows into benchmarks/results/scale.json (gitignored), keyed by
corpus, engine and stage, so the runs above add up to one file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

# _setup: the repo on sys.path, the offline environment, no progress bars
from _setup import RESULTS, ROOT

STAGES = ("ingest", "validate", "dedup", "tokenize")
RAY_STAGES = ("validate", "dedup")  # the stages that send shard jobs through llmops.data.engine
STAGE_INPUT = {"ingest": None, "validate": "raw", "dedup": "validated", "tokenize": "dedup"}
STAGE_OUTPUTS = {"ingest": ("raw",), "validate": ("validated",), "dedup": ("dedup",), "tokenize": ("tokens",)}
OUTPUT_PATHS = ("raw", "validated", "quarantine", "reports", "dedup", "duplicates", "tokens", "tokenizer")
OVERRIDES = ["validate.min_pass_rate=0.5"]
SAMPLE_EVERY_S = 0.2
MARKER = "LLMOPS_BENCH_SCALE_RUN"  # set in the stage's environment; Ray's processes inherit it
# Word swaps for synthetic copies: common in Python, so most documents change in a few places.
SWAPS = [("self", "this"), ("return", "yield"), ("None", "Null"), ("import", "include"), ("def ", "fn "),
         ("if ", "when "), ("for ", "each "), ("class ", "struct "), ("True", "Yes"), ("value", "val")]


# --- corpora ---------------------------------------------------------------------------------------------------------

def code_roots() -> list[tuple[str, Path]]:
    """(install label, directory) of every Python 3 install whose .py files make the real-code corpora, in order."""
    roots = []
    for pyenv in (Path.home() / ".pyenv", Path("/root/.pyenv")):
        for lib in sorted(pyenv.glob("versions/*/lib/python3*")):
            if lib.is_dir() and ("pyenv-" + lib.parents[1].name, lib) not in roots:
                roots.append(("pyenv-" + lib.parents[1].name, lib))
    roots += [("venv-site-packages", p) for p in sorted((ROOT / ".venv" / "lib").glob("python3*/site-packages"))]
    return roots


def code_files() -> list[tuple[str, Path]]:
    """(record id, file) of every .py file under code_roots(), sorted within each root, symlinks not followed."""
    out = []
    for label, root in code_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.endswith(".py") and not path.is_symlink() and path.is_file():
                    out.append((f"{label}/{path.relative_to(root.parent).as_posix()}", path))
    return out


def iter_code_records():
    """{"id", "text"} of every real-code file; undecodable bytes become U+FFFD (validate sees them as control chars)."""
    for rid, path in code_files():
        try:
            yield {"id": rid, "text": path.read_bytes().decode("utf-8", "replace")}
        except OSError:
            continue


def perturb(text: str, copy: int) -> str:
    for i in range(3):
        old, new = SWAPS[(copy + i * 3) % len(SWAPS)]
        text = text.replace(old, new, 1)
    return f"{text}\n# copy {copy}\n"


def write_corpus(path: Path, target_bytes: int, synthetic: bool) -> dict:
    """Stream records into `path` until their text reaches `target_bytes`; a manifest beside it caches the result."""
    manifest = path.with_suffix(".manifest.json")
    if path.exists() and manifest.exists():
        return json.loads(manifest.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    docs = text_bytes = copies = 0
    capped = True
    start = time.perf_counter()
    with open(tmp, "w", encoding="utf-8") as f:
        copy = 0
        while capped:
            for record in iter_code_records():
                if copy:
                    record = {"id": f"copy{copy}/{record['id']}", "text": perturb(record["text"], copy)}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                docs += 1
                text_bytes += len(record["text"].encode("utf-8"))
                if text_bytes >= target_bytes:
                    capped = False
                    break
            copy += 1
            if not synthetic:
                break
        copies = copy
    tmp.rename(path)
    info = {
        "path": str(path),
        "docs": docs,
        "text_bytes": text_bytes,
        "file_bytes": path.stat().st_size,
        "target_bytes": target_bytes,
        "capped": capped,  # the real code ran out before target_bytes
        "copies": copies if synthetic else 1,
        "build_seconds": time.perf_counter() - start,
    }
    manifest.write_text(json.dumps(info, indent=2) + "\n")
    return info


def corpus(name: str, work: Path) -> dict:
    """{name, source (ingest.source), text_bytes, ...} of a corpus, built if not cached."""
    if name == "stdlib":
        from llmops.data.sources import resolve_sources

        files = [p for _, _, p in resolve_sources("", "**/*.py", ROOT)]
        return {"name": name, "source": "", "docs": len(files), "text_bytes": sum(p.stat().st_size for p in files), "capped": False}
    if m := re.fullmatch(r"(\d+)mb", name):
        info = write_corpus(work / "corpora" / f"code-{name}.jsonl", int(m[1]) * 1_000_000, synthetic=False)
    elif m := re.fullmatch(r"synthetic-(\d+(?:\.\d+)?)gb", name):
        info = write_corpus(work / "corpora" / f"{name}.jsonl", int(float(m[1]) * 1e9), synthetic=True)
    else:
        raise SystemExit(f"--corpora: unknown corpus {name!r} (stdlib, <N>mb, or --synthetic-gb N)")
    return {"name": name, "source": info["path"], **info}


# --- one stage in a subprocess (--run-stage) --------------------------------------------------------------------------

def run_stage(args: argparse.Namespace) -> None:
    """The subprocess: load the params snapshot, point every output at the stage dirs, time the stage's run()."""
    from llmops.params.load import load_params
    from tasks import dedup, ingest, tokenize, validate

    spec = json.loads(args.run_stage)
    params = load_params(Path(spec["params"]), [*OVERRIDES, f"ingest.source={json.dumps(spec['source'])}"])
    paths = params.paths.model_copy(update={k: Path(v) for k, v in spec["paths"].items()})
    calls = {
        "ingest": lambda: ingest.run(params.ingest, paths),
        "validate": lambda: validate.run(params.validate_, paths),
        "dedup": lambda: dedup.run(params.dedup, paths),
        "tokenize": lambda: tokenize.run(params.tokenize, params.model, paths),
    }
    start = time.perf_counter()
    result = calls[spec["stage"]]()
    seconds = time.perf_counter() - start
    print(result.summary, flush=True)
    Path(spec["result"]).write_text(json.dumps({"seconds": seconds, "metrics": result.metrics, "summary": result.summary}, default=str))


# --- memory sampling --------------------------------------------------------------------------------------------------

class TreeMemory:
    """Peak summed PSS and RSS of a process tree plus the processes that carry `marker` in their environment."""

    def __init__(self, root_pid: int, marker: str, started: float):
        import psutil

        self.psutil, self.root_pid, self.marker, self.started = psutil, root_pid, marker, started
        self.tracked: dict[int, object] = {}
        self.judged: dict[tuple[int, float], bool] = {}
        self.peak_pss = self.peak_rss = self.peak_procs = 0
        self.peak_breakdown: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _ours(self, proc) -> bool:
        """Started after the stage and carries the marker (or, environment unreadable, names ray)."""
        key = (proc.pid, proc.info["create_time"] or 0.0)
        if key not in self.judged:
            ours = False
            if (proc.info["create_time"] or 0.0) >= self.started - 0.5:
                try:
                    ours = proc.environ().get(MARKER) == self.marker
                except (self.psutil.AccessDenied, self.psutil.ZombieProcess):
                    ours = "ray" in " ".join(proc.info["cmdline"] or []).lower()
                except self.psutil.NoSuchProcess:
                    ours = False
            self.judged[key] = ours
        return self.judged[key]

    def processes(self) -> list:
        ps = self.psutil
        try:
            root = ps.Process(self.root_pid)
            self.tracked[root.pid] = root
            for child in root.children(recursive=True):
                self.tracked.setdefault(child.pid, child)
        except ps.NoSuchProcess:
            pass
        for proc in ps.process_iter(["create_time", "cmdline"]):
            if proc.pid not in self.tracked and proc.pid != os.getpid() and self._ours(proc):
                self.tracked[proc.pid] = proc
        return list(self.tracked.values())

    def sample(self) -> None:
        pss = rss = 0
        breakdown: dict[str, int] = {}
        alive = 0
        for proc in self.processes():
            try:
                mem = proc.memory_full_info()
                name = proc.name()
            except (self.psutil.NoSuchProcess, self.psutil.ZombieProcess, self.psutil.AccessDenied):
                self.tracked.pop(proc.pid, None)
                continue
            alive += 1
            pss += mem.pss
            rss += mem.rss
            breakdown[name] = breakdown.get(name, 0) + mem.pss
        self.samples += 1
        if pss > self.peak_pss:
            self.peak_pss, self.peak_breakdown = pss, breakdown
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, alive)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_EVERY_S)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[int]:
        """Stop sampling; the pids of marked processes still alive (left behind by the stage)."""
        self._stop.set()
        self._thread.join()
        left = []
        for proc in self.processes():
            if proc.pid != self.root_pid and proc.is_running():
                left.append(proc.pid)
        return left


def kill_leftovers(pids: list[int]) -> int:
    """SIGTERM, then SIGKILL after 5 s, the processes a stage left behind (a Ray that outlived its driver)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        proc.kill()
    return len(procs)


# --- the orchestrator -------------------------------------------------------------------------------------------------

def text_bytes_of(directory: Path) -> tuple[int, int]:
    """(records, UTF-8 text bytes) of a stage's shards, read a shard's text column at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from llmops.common.io import record_shards

    docs = nbytes = 0
    for shard in record_shards(directory):
        text = pq.read_table(shard, columns=["text"]).column("text")
        docs += len(text)
        nbytes += int(pc.sum(pc.binary_length(text.fill_null(""))).as_py() or 0)
    return docs, nbytes


def stage_paths(run_dir: Path, engine_dir: Path, stage: str, engine: str, both: bool) -> dict[str, str]:
    """Every output under the engine's dir; a Ray stage in --engine both reads the process pool's input."""
    paths = {k: str(engine_dir / k) for k in OUTPUT_PATHS}
    if both and engine == "ray":
        upstream = STAGE_INPUT[stage]
        paths[upstream] = str(run_dir / "processes" / upstream)
    return paths


def outputs_digest(paths: dict[str, str], stage: str) -> str:
    from llmops.common.fingerprints import directory_digest

    return ":".join(directory_digest(Path(paths[k]), algorithm="sha256") for k in STAGE_OUTPUTS[stage])


def measure(stage: str, engine: str, source: str, paths: dict[str, str], params_file: Path, log_dir: Path, timeout_s: float) -> dict:
    """Run one stage in a fresh subprocess, sampling its memory; the row for the table (or the failure)."""
    marker = uuid.uuid4().hex
    result_file = log_dir / f"{stage}-{engine}.result.json"
    result_file.unlink(missing_ok=True)
    spec = {"stage": stage, "params": str(params_file), "source": source, "paths": paths, "result": str(result_file)}
    env = {**os.environ, MARKER: marker, "LLMOPS_DATA_ENGINE": engine, "LLMOPS_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)  # a local Ray started by the stage, never someone's cluster
    log = log_dir / f"{stage}-{engine}.log"
    started = time.time()
    wall_start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--run-stage", json.dumps(spec)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        memory = TreeMemory(child.pid, marker, started)
        memory.start()
        try:
            rc = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            rc = child.wait()
        process_s = time.perf_counter() - wall_start
        left = memory.stop()
    killed = kill_leftovers(left) if left else 0
    row = {
        "stage": stage,
        "engine": engine,
        "process_seconds": process_s,
        "peak_pss_bytes": memory.peak_pss,
        "peak_rss_bytes": memory.peak_rss,
        "peak_processes": memory.peak_procs,
        "peak_pss_by_process_name": dict(sorted(memory.peak_breakdown.items(), key=lambda kv: -kv[1])),
        "memory_samples": memory.samples,
        "leftover_processes_killed": killed,
        "log": str(log),
    }
    if rc != 0 or not result_file.exists():
        tail = log.read_text(errors="replace").splitlines()[-40:]
        return row | {"ok": False, "returncode": rc, "error_tail": "\n".join(tail)}
    result = json.loads(result_file.read_text())
    return row | {"ok": True, "seconds": result["seconds"], "metrics": result["metrics"], "summary": result["summary"]}


def run_corpus(info: dict, engines: list[str], stages: list[str], work: Path, params_file: Path, timeout_s: float, keep: bool) -> list[dict]:
    run_dir = work / "runs" / info["name"]
    if stages[0] == STAGES[0]:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:  # later stages alone: on what a --keep run left (each stage replaces only its own outputs)
        upstream = run_dir / "processes" / STAGE_INPUT[stages[0]]
        if not upstream.is_dir():
            raise SystemExit(f"--stages {','.join(stages)}: {upstream} is missing; run the stages before it with --keep first")
    both = len(engines) == 2
    rows = []
    for engine in engines:
        engine_dir = run_dir / engine
        engine_dir.mkdir(parents=True, exist_ok=True)
        for stage in stages:
            if both and engine == "ray" and stage not in RAY_STAGES:
                continue
            paths = stage_paths(run_dir, engine_dir, stage, engine, both)
            upstream = STAGE_INPUT[stage]
            if upstream is None:
                docs, nbytes = info["docs"], info["text_bytes"]
            else:
                docs, nbytes = text_bytes_of(Path(paths[upstream]))
            print(f"[{time.strftime('%H:%M:%S')}] {info['name']} {engine} {stage}: {nbytes / 1e6:.1f} MB in ...", flush=True)
            row = measure(stage, engine, info["source"], paths, params_file, engine_dir, timeout_s)
            row |= {"corpus": info["name"], "corpus_bytes": info["text_bytes"], "input_docs": docs, "input_bytes": nbytes}
            if row["ok"]:
                row["mb_per_s"] = nbytes / 1e6 / row["seconds"]
                if both and engine == "ray":
                    reference = stage_paths(run_dir, run_dir / "processes", stage, "processes", both)
                    row["identical_to_processes"] = outputs_digest(paths, stage) == outputs_digest(reference, stage)
                print(f"    {row['seconds']:.1f} s ({row['process_seconds']:.1f} s process), {row['mb_per_s']:.2f} MB/s, "
                      f"peak PSS {row['peak_pss_bytes'] / 1e6:.0f} MB, RSS {row['peak_rss_bytes'] / 1e6:.0f} MB, "
                      f"{row['peak_processes']} processes; {row['summary']}", flush=True)
            else:
                print(f"    FAILED (rc {row['returncode']}), log {row['log']}:\n{row['error_tail']}", flush=True)
            rows.append(row)
            if not row["ok"]:
                break  # later stages have no input
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def print_tables(rows: list[dict]) -> None:
    for engine in dict.fromkeys(r["engine"] for r in rows):
        print(f"\n### engine: {engine}\n")
        print("| corpus | input MB | stage | seconds | MB/s | peak PSS MB | peak RSS MB |")
        print("|---|---:|---|---:|---:|---:|---:|")
        for r in (r for r in rows if r["engine"] == engine):
            if r["ok"]:
                print(f"| {r['corpus']} | {r['input_bytes'] / 1e6:.1f} | {r['stage']} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | "
                      f"{r['peak_pss_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / 1e6:.0f} |")
            else:
                print(f"| {r['corpus']} | {r['input_bytes'] / 1e6:.1f} | {r['stage']} | FAILED | | "
                      f"{r['peak_pss_bytes'] / 1e6:.0f} | {r['peak_rss_bytes'] / 1e6:.0f} |")
    by_key = {(r["corpus"], r["stage"], r["engine"]): r for r in rows if r["ok"]}
    pairs = [(p, by_key[(c, s, "ray")]) for (c, s, e), p in by_key.items() if e == "processes" and (c, s, "ray") in by_key]
    if pairs:
        print("\n### ray / processes\n")
        print("| corpus | stage | seconds | peak PSS | peak RSS | outputs identical |")
        print("|---|---|---:|---:|---:|---|")
        for p, r in pairs:
            print(f"| {p['corpus']} | {p['stage']} | {r['seconds'] / p['seconds']:.2f}x | {r['peak_pss_bytes'] / p['peak_pss_bytes']:.2f}x | "
                  f"{r['peak_rss_bytes'] / p['peak_rss_bytes']:.2f}x | {r.get('identical_to_processes')} |")


def save(rows: list[dict], corpora: list[dict], out: Path) -> None:
    """Merge this run's rows into `out`, replacing rows with the same corpus, engine and stage."""
    import psutil
    import pyarrow
    import ray
    import rensa
    import tokenizers

    old = json.loads(out.read_text()) if out.exists() else {}
    command = " ".join([Path(sys.executable).name, *sys.argv])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for r in rows:
        r |= {"command": command, "when": stamp}
    merged = {(r["corpus"], r["engine"], r["stage"]): r for r in old.get("rows", [])}
    merged |= {(r["corpus"], r["engine"], r["stage"]): r for r in rows}
    report = {
        "benchmark": "bench_scale",
        "overrides": OVERRIDES,
        "sample_every_s": SAMPLE_EVERY_S,
        "env": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total,
            "machine": platform.machine(),
            "pyarrow": pyarrow.__version__,
            "tokenizers": tokenizers.__version__,
            "rensa": getattr(rensa, "__version__", "?"),
            "ray": ray.__version__,
        },
        "corpora": old.get("corpora", {}) | {c["name"]: c for c in corpora},
        "rows": list(merged.values()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpora", default="stdlib,100mb,300mb,850mb", help="comma-separated: stdlib, <N>mb; none for only --synthetic-gb")
    ap.add_argument("--synthetic-gb", type=float, default=0, help="also a synthetic corpus of this many GB of text")
    ap.add_argument("--engine", choices=["processes", "ray", "both"], default="processes")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="consecutive stages of ingest,validate,dedup,tokenize; not starting at ingest, they read the outputs a --keep run left")
    ap.add_argument("--work", default="/tmp/llmops-scale", help="corpora cache and stage outputs")
    ap.add_argument("--keep", action="store_true", help="keep the stage outputs (runs/<corpus>/) after the run")
    ap.add_argument("--timeout-s", type=float, default=3600, help="per stage; a stage past it is killed and reported failed")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    ap.add_argument("--run-stage", help=argparse.SUPPRESS)  # internal: the stage subprocess
    args = ap.parse_args()
    if args.run_stage:
        return run_stage(args)

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # A snapshot of params.yaml: the stages of one run all see the same params, whatever is edited meanwhile.
    params_file = work / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", params_file)
    stages = [s for s in args.stages.split(",") if s]
    first = STAGES.index(stages[0]) if stages and stages[0] in STAGES else -1
    if first < 0 or stages != list(STAGES[first : first + len(stages)]):
        raise SystemExit(f"--stages: expected consecutive stages of {','.join(STAGES)}, got {args.stages}")
    engines = ["processes", "ray"] if args.engine == "both" else [args.engine]
    names = [n for n in args.corpora.split(",") if n and n != "none"]
    if args.synthetic_gb:
        names.append(f"synthetic-{args.synthetic_gb:g}gb")

    corpora, rows = [], []
    for name in names:
        info = corpus(name, work)
        corpora.append(info)
        capped = f"; CAPPED: the real code ran out at {info['text_bytes'] / 1e6:.1f} MB" if info.get("capped") else ""
        print(f"\ncorpus {name}: {info['docs']:,} docs, {info['text_bytes'] / 1e6:.1f} MB of text{capped}", flush=True)
        rows += run_corpus(info, engines, stages, work, params_file, args.timeout_s, args.keep)
        save(rows, corpora, Path(args.out))

    print(f"\n{os.cpu_count()} CPUs; seconds = run() inside the stage subprocess; MB/s over the stage's input text; "
          f"memory = the stage's whole process tree, sampled every {SAMPLE_EVERY_S} s")
    print_tables(rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
