"""`llmops ui` start and stop: MLflow's defaults (`mlflow ui`: 4 web workers, a huey job consumer per GenAI job) vs the
command `llmops ui` runs (flows/cli.py ui_command: workers sized to the cores, job execution off).

Each configuration starts on the same SQLite tracking store (migrated once before timing) in a session of its own:
  up     seconds from the start until GET /health answers 200
  procs  processes in the session once the job runner has launched its consumers (SETTLE_S after /health)
  down   seconds from SIGINT to the whole session (what Ctrl-C sends) until every process in it has exited
Configurations alternate, REPEATS rounds, so a busy machine weighs on both alike. Run from the repository root:

    .venv/bin/python benchmarks/bench_ui.py

Prints a markdown table (medians) and writes benchmarks/results/ui.json (gitignored).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _setup import RESULTS  # noqa: E402  (repo on sys.path, offline environment, no progress bars)

import psutil  # noqa: E402

from flows.cli import ui_command, ui_workers  # noqa: E402

REPEATS = 3
SETTLE_S = 15.0  # MLflow's job runner sleeps 10 s after launching its consumers
TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:  # an exited child not yet reaped
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return found


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def measure(cmd: list[str], server_env: dict[str, str], port: int) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=server_env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not healthy(port):
            if proc.poll() is not None or time.perf_counter() - start > TIMEOUT_S:
                raise RuntimeError(f"{' '.join(cmd)} did not answer /health (exit {proc.poll()})")
            time.sleep(0.1)
        up = time.perf_counter() - start
        time.sleep(SETTLE_S)
        procs = len(session_processes(proc.pid))
        stop = time.perf_counter()
        os.killpg(proc.pid, signal.SIGINT)
        while proc.poll() is None or session_processes(proc.pid):
            if time.perf_counter() - stop > TIMEOUT_S:
                raise RuntimeError(f"{' '.join(cmd)}: processes left {TIMEOUT_S:.0f} s after SIGINT")
            time.sleep(0.05)
        return {"up_s": up, "procs": procs, "down_s": time.perf_counter() - stop}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def main() -> None:
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        base_env = dict(os.environ)
        base_env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)
        configs = {
            "mlflow ui (defaults)": lambda port: ([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(port)], base_env),
            f"llmops ui (workers {ui_workers(cores)}, jobs off)": lambda port: ui_command(uri, "127.0.0.1", port, ui_workers(cores)),
        }
        port = free_port()
        measure(*configs["mlflow ui (defaults)"](port), port)  # creates and migrates the store; not counted
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
        for _ in range(REPEATS):
            for name, make in configs.items():
                port = free_port()
                samples[name].append(measure(*make(port), port))
    rows = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}
    print(f"{cores} cores, medians of {REPEATS}, SQLite store\n")
    print("| command | up s | processes | down s |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['up_s']:.1f} | {row['procs']:.0f} | {row['down_s']:.1f} |")
    base, ours = rows.values()
    print(f"\nratio defaults/ours: up {base['up_s'] / ours['up_s']:.1f}x, down {base['down_s'] / ours['down_s']:.1f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ui.json").write_text(json.dumps({"cores": cores, "repeats": REPEATS, "medians": rows, "samples": samples}, indent=2) + "\n")


if __name__ == "__main__":
    main()
