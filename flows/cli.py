"""The `llmops` command: run the pipeline flow, run one stage (what dvc.yaml calls), open the MLflow UI."""

from __future__ import annotations


from llmops.common import env

env.set_offline()  # before any library is imported: nothing may phone home
env.set_quiet_libraries()  # the libraries' own progress bars and chatter off, ours kept (LLMOPS_LIBRARY_PROGRESS=1: back on)

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, NoReturn  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from llmops.common.errors import LlmopsError  # noqa: E402

app = typer.Typer(
    help="llmops: data -> training -> evaluation -> serving, versioned by DVC, tracked by MLflow, orchestrated by Prefect.",
    epilog=f"Console: {env.PROGRESS}=0 turns every progress bar off; {env.LIBRARY_PROGRESS}=1 shows the libraries' own bars too "
    "(transformers, huggingface_hub, datasets, MLflow artifacts, llm-compressor and its INFO log), off by default.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Lines are never wrapped: a log file (no terminal: rich's width is 80) keeps each command and path on one line;
# a terminal wraps long lines itself. Tables pass soft_wrap=False to lay out in the width.
console = Console(stderr=True, soft_wrap=True)
USAGE_EXIT_CODE = 2  # what click exits with on a bad option: a --set that cannot apply is one


def _fail(exc: Exception, code: int = 1) -> NoReturn:
    """Print `error: REASON` and exit with `code`. The reason is never empty, never read as rich markup (a message
    holding `[...]` would lose that text), and never wrapped, so a grep for `error:` finds all of it."""
    reason = str(exc).strip() or f"{type(exc).__name__} (no message)"
    if not isinstance(exc, LlmopsError):
        reason = f"{type(exc).__name__}: {reason}"
    console.print("[bold red]error:[/]", escape(reason), soft_wrap=True)
    raise typer.Exit(code=code)


@app.command()
def run(
    from_stage: Annotated[str | None, typer.Option("--from", help="First stage to run (default: the first in dvc.yaml).")] = None,
    to_stage: Annotated[str | None, typer.Option("--to", help="Last stage to run (default: the last).")] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Set a param, e.g. --set dedup.threshold=0.8 (repeatable). Written into params.yaml and kept there, as `dvc exp run "
            "--set-param` does, so `dvc repro` repeats this run; a bad value is refused and params.yaml left untouched.",
        ),
    ] = None,
    repo: Annotated[Path, typer.Option(help="Repository root holding dvc.yaml and params.yaml.")] = Path("."),
    deploy_after: Annotated[bool, typer.Option("--deploy/--no-deploy", help="End a whole-DAG run with the deploy flow on the champion (serve.after_run).")] = True,
    keep_serving: Annotated[bool, typer.Option(help="Leave the deployed champion running.")] = False,
    monitor_after: Annotated[
        bool, typer.Option("--monitor/--no-monitor", help="End a whole-DAG run with the drift monitor on the held-out batch (monitor.after_run).")
    ] = True,
) -> None:
    """Run the pipeline flow (Prefect): each dvc.yaml stage, skipped when DVC says it is up to date; then deploy the
    champion and run the drift monitor once on the held-out batch. `--set` values are written into params.yaml for good."""
    from llmops.params.load import load_params

    params_file = repo / "params.yaml"
    try:
        load_params(params_file)  # a broken params.yaml fails here, before Prefect starts
    except LlmopsError as exc:
        _fail(exc)
    try:
        planned = load_params(params_file, overrides)  # the whole new params: a bad --set is a usage error and writes nothing
    except LlmopsError as exc:
        _fail(exc, code=USAGE_EXIT_CODE)
    try:
        from llmops.common.stages import check_outputs_replaceable

        check_outputs_replaceable(planned.paths)  # fast, before Prefect starts; the flow checks again for deployments
        from flows.pipeline import pipeline

        result = pipeline(from_stage=from_stage, to_stage=to_stage, overrides=overrides or [], repo_dir=str(repo))
    except LlmopsError as exc:
        _fail(exc)
    except Exception as exc:  # not one of ours: the traceback is for a bug report, the error line still says why
        console.print_exception()
        _fail(exc)
    params = load_params(params_file)
    after: list[str] = []  # the deploy and monitor verdicts, repeated in the summary
    if deploy_after and params.serve.after_run and to_stage is None:
        after.append(_deploy_champion(params, keep_serving, pipeline_run_id=result["mlflow_run_id"]))
    if monitor_after and params.monitor.after_run and to_stage is None:
        console.print("monitor: the drift monitor on the held-out batch (a healthy run is not flagged)")
        after.append(_monitor(None, heldout=True, retrain=False, repo=repo, force=True, pipeline_run_id=result["mlflow_run_id"]))
    _stop_prefect_services()
    for line in _run_summary(result, params, after):
        console.print(line)


def _run_summary(result: dict, params, after: list[str]) -> list[str]:
    """The lines that end `llmops run`: what ran, the records' accounting, where runs, data, models and metrics are."""
    from llmops.common.tracking import tracking_uri

    ran = [s for s, r in result["stages"].items() if not r["cached"]]
    cached = [s for s, r in result["stages"].items() if r["cached"]]
    lines = [f"\n[bold green]pipeline done[/]: ran {', '.join(ran) or 'nothing'}; up to date: {', '.join(cached) or 'none'}"]
    if result["accounting"]:
        a = result["accounting"]
        lines.append(f"records: {a['records_in']} in = {a['kept']} kept + {a['quarantined']} quarantined + {a['duplicates']} duplicates")
    lines.append(f"MLflow run {result['mlflow_run_id']} at {tracking_uri(params.tracking, params.paths.root)}  ->  `llmops ui` (or `mlflow ui --backend-store-uri {params.tracking.uri}`)")
    rel = params.paths.as_params()
    lines.append(f"data: {rel['raw']}, {rel['validated']}, {rel['quarantine']}, {rel['dedup']}, {rel['duplicates']}, {rel['tokens']}, {rel['instructions']}")
    lines.append(f"models: {rel['tokenizer']}, {rel['pretrain_model']}, {rel['finetune_model']} (LoRA merged), {rel['adapter']}, {rel['aligned_model']} (align's candidate: metrics/align.json), {rel['student_model']} (distilled draft), {rel['quantized']}/<scheme> (table: {rel['reports']}/quantize/table.md)")
    lines.append(f"metrics: `dvc metrics show` (the headline, {rel['metrics']}/summary.json; each stage's in {rel['metrics']}/<stage>.json); Data Docs: {rel['reports']}/validate/data_docs/index.html")
    if "register" in result["stages"] and (registered := result["stages"]["register"]["metrics"]):
        lines.append(
            f"registry: {registered['model_name']} version {registered['version']} is challenger, gate {registered['decision']}; "
            f"champion is version {registered['champion_after']}  ->  `llmops models`"
        )
    return lines + [line for line in after if line]


def _stop_prefect_services() -> None:
    """Send the flow runs' last logs and events to the Prefect API, then stop the temporary server Prefect started for
    them (without a PREFECT_API_URL); it would otherwise log "Stopping temporary server" at exit, after the summary.
    Its history stays in PREFECT_HOME's database."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    EventsWorker.drain_all()
    if server := sys.modules.get("prefect.server.api.server"):  # imported only where Prefect started a temporary server
        server.SubprocessASGIServer().stop()  # the instance without a port is the temporary server


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="Stage name from dvc.yaml, e.g. ingest, validate, dedup, tokenize.")],
    params_file: Annotated[Path, typer.Option("--params", help="params.yaml to read.")] = Path("params.yaml"),
    track: Annotated[bool, typer.Option(help="Log the stage to MLflow.")] = True,
) -> None:
    """Run one stage in-process (this is what dvc.yaml calls); prefer `dvc repro` or `llmops run`."""
    try:
        from llmops.common.runner import run_stage
        from llmops.params.load import load_params

        result = run_stage(name, load_params(params_file), track=track, params_file=params_file)
    except LlmopsError as exc:
        _fail(exc)
    if not result.summary:  # worker processes of a distributed stage leave the summary to rank 0
        return
    if summary_file := env.summary_file():  # under the pipeline flow, which logs it: the console and the Prefect UI
        from llmops.common.io import atomic_write_bytes

        path = Path(summary_file)  # a launched stage's rank 0 wrote its summary first; the launcher's line follows
        before = path.read_text(encoding="utf-8") if path.exists() else ""
        atomic_write_bytes(path, (before + result.summary + "\n").encode())
    else:
        console.print(result.summary, markup=False)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    workers: Annotated[int, typer.Option(help="Web server processes (0: one per two CPU cores, 1 to 4).")] = 0,
    params_file: Annotated[Path, typer.Option("--params", help="params.yaml to read.")] = Path("params.yaml"),
) -> None:
    """Start the MLflow UI on the project's tracking store, sized for this machine's cores; MLflow's GenAI job
    workers stay off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true."""
    from llmops.params.load import load_params
    from llmops.common.tracking import tracking_uri

    params = load_params(params_file)
    uri = tracking_uri(params.tracking, params.paths.root)
    cmd, server_env = ui_command(uri, host, port, workers or ui_workers(os.cpu_count() or 1))
    console.print(f"MLflow UI on http://{host}:{port} for {uri} ({cmd[cmd.index('--workers') + 1]} web worker(s); Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(cmd, env=server_env))


def ui_workers(cores: int) -> int:
    """One web server process per two cores, 1 to 4: the UI has one user, and `mlflow server`'s default of 4 processes
    took a 2-core machine tens of seconds to start and stop (benchmarks/bench_ui.py measures it)."""
    return max(1, min(4, cores // 2))


def ui_command(uri: str, host: str, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
    """The `mlflow ui` command line and environment of `llmops ui`. MLflow's job execution (a huey consumer per GenAI
    job: scorers, evaluation, prompt optimization, issue detection, none of which this project runs) is off unless the
    environment turns it on."""
    server_env = {env.MLFLOW_JOB_EXECUTION: "false"} | dict(os.environ)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", str(workers)]
    return cmd, server_env


@app.command()
def models(
    name: Annotated[str, typer.Option(help="Registered model name (default: register.model_name).")] = "",
    wide: Annotated[bool, typer.Option("--wide", help="Every column, whole ids, whatever the terminal width.")] = False,
    params_file: Annotated[Path, typer.Option("--params", help="params.yaml to read.")] = Path("params.yaml"),
) -> None:
    """List the registered model's versions (and its quantized variants) with aliases, gate metrics and lineage.

    The table fits the terminal (or $COLUMNS): ids are shortened, then the lineage columns dropped, and a line on
    stderr names what was left out. Piped without $COLUMNS, or with --wide, it is printed whole."""
    from llmops.registry import store as registry
    from llmops.params.load import load_params

    try:
        params = load_params(params_file)
        rows = registry.list_versions(name or registry.model_name(params.register), _store(params))
    except LlmopsError as exc:
        _fail(exc)
    if not rows:
        console.print(f"no registered versions of {name or registry.model_name(params.register)} yet: `llmops run` registers one")
        return
    width = None if wide else output_width()
    table, hidden = versions_table(rows, width)
    Console(width=min(table_width(table), width or sys.maxsize), soft_wrap=False).print(table)  # still too wide: cells wrap
    if hidden:
        console.print(f"not shown to fit {width} columns: {', '.join(hidden)} (`llmops models --wide` shows all)")


# The lineage columns of `llmops models`, in the order they give way to a narrow terminal.
NARROW_DROPS = ("run_id", "eval_data", "git_commit", "base_version")
ID_CHARS = 8  # an MLflow run id shortened to this still finds its run in the UI's search
SIGNIFICANT_DIGITS = 4
_DECIMAL = re.compile(r"-?\d+\.\d*(e[-+]?\d+)?", re.IGNORECASE)


def output_width() -> int | None:
    """The width stdout's tables must fit: the terminal's (or $COLUMNS when set); None when piped without $COLUMNS."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return shutil.get_terminal_size().columns
    return None


def rounded(value: object) -> str:
    """A measurement to SIGNIFICANT_DIGITS digits (0.062512 -> 0.06251, 12.34567 -> 12.35); ids, counts and text
    unchanged (a hex git prefix may read as a number, so only strings with a decimal point count as measurements)."""
    if isinstance(value, float) or (isinstance(value, str) and _DECIMAL.fullmatch(value)):
        return f"{float(value):.{SIGNIFICANT_DIGITS}g}"
    return str(value)


def table_width(table) -> int:
    from rich.measure import Measurement

    wide = Console(width=10_000)
    return Measurement.get(wide, wide.options, table).maximum


def versions_table(rows: list[dict[str, object]], width: int | None):
    """The rich Table of `llmops models` with rounded numbers, fitted into `width` columns (None: whole), and the
    names of the columns left out."""
    from rich.table import Table

    columns = list(rows[0])
    cells = [{k: rounded(row.get(k, "")) for k in columns} for row in rows]

    def build() -> Table:
        table = Table(*columns)
        for row in cells:
            table.add_row(*(row[k] for k in columns))
        return table

    table, hidden = build(), []
    if width is None or table_width(table) <= width:
        return table, hidden
    if "run_id" in columns:
        for row in cells:
            row["run_id"] = row["run_id"][:ID_CHARS]
        table = build()
    for column in NARROW_DROPS:
        if table_width(table) <= width:
            break
        if column in columns:
            columns.remove(column)
            hidden.append(column)
            table = build()
    return table, hidden


def _store(params):
    from llmops.registry.store import Store

    return Store.of(params.tracking, params.paths)


def _deploy_champion(params, keep_serving: bool, pipeline_run_id: str = "") -> str:
    """The end of `llmops run`: the deploy flow on the champion (its MLflow run nested under the pipeline's), or a
    note when the gate has not made one yet. Returns the line for the run's summary."""
    from llmops.registry.store import alias_version, model_name

    name = model_name(params.register)
    if alias_version(name, "champion", _store(params)) is None:
        return f"deploy: {name} has no champion yet (no version passed the register gate), nothing to serve"
    try:
        from flows.deploy import deploy as deploy_flow

        result = deploy_flow(model=f"{name}@champion", keep_serving=keep_serving, repo_dir=str(params.paths.root), pipeline_run_id=pipeline_run_id)
    except LlmopsError as exc:
        _fail(exc)
    return result["summary"]


def _stop_servers_on_sigterm() -> None:
    """SIGTERM (docker stop, kill, a process manager) unwinds like Ctrl-C, so the `finally` that stops the servers runs."""
    import signal

    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="NAME@ALIAS, NAME@VERSION or a local HF model directory (default: <register.model_name>@production).")] = "",
    backend: Annotated[str, typer.Option(help="auto | vllm | transformers (auto: serve.backend; vllm where installed with a GPU).")] = "auto",
    quantized: Annotated[str, typer.Option(help="Serve the registered quantized variant of that version, e.g. w8a8.")] = "",
    port: Annotated[int, typer.Option(help="Public port (default: serve.port).")] = 0,
    params_file: Annotated[Path, typer.Option("--params", help="params.yaml to read.")] = Path("params.yaml"),
) -> None:
    """Serve a model on an OpenAI-compatible API behind an API key, in the foreground until Ctrl-C."""
    import time

    from llmops.params.load import load_params
    from llmops.serving.backends import choose_backend, inspect_model, with_draft
    from llmops.serving.server import api_key, start

    _stop_servers_on_sigterm()
    try:
        from llmops.registry.store import ENDPOINT_TAG, clear_endpoint, model_name, record_endpoint, resolve

        params = load_params(params_file)
        cfg, store = params.serve, _store(params)
        spec = model or f"{model_name(params.register)}@production"
        ref = resolve(spec, store, quantized=quantized)
        served = with_draft(inspect_model(ref.path, ref.name or ref.path.name), cfg, params.paths)
        chosen = choose_backend(cfg.backend if backend == "auto" else backend)
        console.print(f"starting {chosen} for {spec} ({ref.path}); waiting up to {cfg.health_timeout_s:.0f} s for /health")
        server = start(
            served, cfg, chosen, api_key(cfg, params.paths.root), port=port or cfg.port, log_dir=params.paths.reports / "serve", cwd=params.paths.root,
            model_version=ref.version,
        )
    except LlmopsError as exc:
        _fail(exc)
    key_from = f"${env.API_KEY}" if env.get(env.API_KEY) else f"the file {cfg.api_key_file}"
    failure = ""
    try:
        if ref.name:  # a registered version: its lineage shows where it is served while this runs
            record_endpoint(ref.name, ref.version, server.url, store)
        console.print(f"[bold green]serving[/] {served.name} at {server.openai_base_url} (OpenAI API; Authorization: Bearer <key from {key_from}>)")
        console.print(f"logs: {server.log_dir}; Ctrl-C to stop")
        while server.running():
            time.sleep(1)
        # The supervisor restarts a dead or unhealthy backend up to serve.max_restarts times; past that it stops all.
        failure = getattr(server, "failure", "") or "a server process exited"
        console.print(f"[bold red]{escape(failure)}[/]; logs: {server.log_dir}")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if ref.name:
            try:
                clear_endpoint(ref.name, ref.version, server.url, store)
            except Exception as exc:  # the server is down either way; a stale tag only makes lineage probe a dead URL
                console.print(f"could not remove the {ENDPOINT_TAG} tag of {ref.name} v{ref.version}: {exc}")
    if failure:
        raise typer.Exit(code=1)  # so a supervisor (systemd, k8s) restarts it
    console.print("stopped")


@app.command()
def deploy(
    model: Annotated[str, typer.Option(help="NAME@ALIAS, NAME@VERSION or a local HF model directory (default: <register.model_name>@champion).")] = "",
    backend: Annotated[str, typer.Option(help="auto | vllm | transformers.")] = "auto",
    quantized: Annotated[str, typer.Option(help="Deploy the registered quantized variant, e.g. w8a8.")] = "",
    port: Annotated[int, typer.Option(help="Public port (default: serve.port).")] = 0,
    keep_serving: Annotated[bool, typer.Option(help="Leave the server running after the tests pass.")] = False,
) -> None:
    """The deploy flow: serve the model, smoke- and load-test it, and on success point the `production` alias at it."""
    _stop_servers_on_sigterm()
    try:
        from flows.deploy import deploy as deploy_flow

        result = deploy_flow(model=model, backend=backend, quantized=quantized, port=port, keep_serving=keep_serving)
    except LlmopsError as exc:
        _fail(exc)
    console.print(result["summary"])
    if keep_serving:
        console.print(f"server processes {result['pids']} keep running; stop them with `kill -TERM -PID` for each")


@app.command()
def monitor(
    batch: Annotated[
        str | None, typer.Option("--batch", help="New data to check: a file, directory, glob, .jsonl or .parquet (what ingest reads), relative to --repo.")
    ] = None,
    heldout: Annotated[bool, typer.Option("--heldout", help="Export tokenize's held-out split to monitor.heldout_batch and check it (never flagged on a healthy run).")] = False,
    retrain: Annotated[bool, typer.Option(help="Past a threshold, retrain with the batch added (also needs monitor.retrain).")] = True,
    repo: Annotated[Path, typer.Option(help="Repository root holding dvc.yaml and params.yaml.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Also check files the monitor's ledger (monitor.workdir/ledger.json) already checked.")] = False,
) -> None:
    """Drift monitor (the Prefect `monitor` flow): compare a batch with the training data; metrics/monitor.json + an MLflow run."""
    _monitor(batch, heldout=heldout, retrain=retrain, repo=repo, force=force)


def _monitor(batch: str | None, *, heldout: bool, retrain: bool, repo: Path, force: bool = False, pipeline_run_id: str = "") -> str:
    """Run the monitor flow and print its table; returns the verdict line (`llmops run` repeats it in its summary).
    `pipeline_run_id`: the pipeline run this check ends; its MLflow run and the monitor's are linked by tags both ways."""
    if bool(batch) == heldout:
        _fail(LlmopsError("give exactly one of --batch PATH_OR_GLOB or --heldout"))
    try:
        from flows.monitor import monitor as monitor_flow
        from llmops.params.load import load_params

        params = load_params(repo / "params.yaml")
        if heldout:
            from llmops.monitoring.drift import export_heldout

            export_heldout(params)
            batch = params.monitor.heldout_batch  # relative to the repository, like ingest.source
        result = monitor_flow(batch=batch, retrain=retrain, repo_dir=str(repo), force=force, pipeline_run_id=pipeline_run_id)
    except LlmopsError as exc:
        _fail(exc)
    if result.get("skipped"):
        console.print(result["summary"])
        return result["summary"]
    from rich.table import Table

    table = Table(title=f"drift checks: batch {result['batch_id']}")
    for column in ("check", "score", "threshold", "verdict", "note"):
        table.add_column(column)
    for name, check in result["metrics"]["checks"].items():
        score = "n/a" if check["score"] is None else f"{check['score']:.4f}"
        bound = ("<= " if check["kind"] == "max" else ">= ") + str(check["threshold"])
        table.add_row(name, score, bound, "[red]FLAGGED[/]" if check["flagged"] else "[green]ok[/]", check.get("note", ""))
    console.print(table, soft_wrap=False)
    verdict = "[bold red]DRIFT[/]" if result["drift"] else "[bold green]no drift[/]"
    line = f"monitor: {verdict}; metrics/monitor.json; MLflow run {result['mlflow_run_id']} (experiment {params.monitor.experiment})"
    console.print(line)
    if "retrain" in result:
        r = result["retrain"]
        console.print(f"retrained via {r['mode']} with {r['batch_file']}; champion {r['champion_before']} -> {r['champion_after']}")
    return line


@app.command()
def lineage(
    spec: Annotated[str, typer.Argument(help="NAME@VERSION or NAME@ALIAS, e.g. llmops-code@champion.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")] = False,
    params_file: Annotated[Path, typer.Option("--params", help="params.yaml to read.")] = Path("params.yaml"),
) -> None:
    """The chain of a registered version: endpoint -> version -> runs -> DVC md5 of each data output -> git commit -> params."""
    import json

    try:
        from llmops.registry import lineage as lineage_mod
        from llmops.params.load import load_params

        chain = lineage_mod.lineage(spec, _store(load_params(params_file)))
    except LlmopsError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(chain, indent=2))
    else:
        Console().print(lineage_mod.render_tree(chain))


@app.command()
def reproduce(
    spec: Annotated[str, typer.Argument(help="NAME@VERSION or NAME@ALIAS, e.g. llmops-code@champion.")],
    tolerance: Annotated[float, typer.Option(help="Largest relative difference (absolute below 1) that still matches.")] = 1e-6,
    keep: Annotated[bool, typer.Option(help="Keep the temporary worktree (its path is printed).")] = False,
    repo: Annotated[Path, typer.Option(help="Repository root holding dvc.yaml and params.yaml.")] = Path("."),
) -> None:
    """Re-run a registered version at its git commit on exactly its data versions; compare every deterministic metric."""
    from rich.table import Table

    try:
        from llmops.registry import reproduce as reproduce_mod
        from llmops.params.load import load_params

        params = load_params(repo / "params.yaml")
        result = reproduce_mod.reproduce(spec, _store(params), params.paths, tolerance=tolerance, keep=keep)
    except LlmopsError as exc:
        _fail(exc)
    table = Table(title=f"reproduce {result['spec']} at {result['commit'][:12]} ({result['params']})")
    for column in ("stage", "metric", "registered", "reproduced", "match"):
        table.add_column(column)
    for c in result["comparisons"]:
        shown = "missing" if c.reproduced is None else f"{c.reproduced:.8g}"
        table.add_row(c.stage, c.metric, f"{c.registered:.8g}", shown, "[green]yes[/]" if c.match else "[red]NO[/]")
    Console().print(table)
    outputs = result["outputs"]
    for path, md5 in outputs.items():
        diff = md5["differing_files"]
        if md5["registered"] == md5["reproduced"]:
            verdict = "bitwise identical"
        elif diff is None:
            verdict = "differs (file listings not in the cache)"
        else:
            weights = [f for f in diff if f.endswith((".safetensors", ".bin"))]
            verdict = f"{'weights differ' if weights else 'weights bitwise identical'}; files that differ: {', '.join(diff)}"
        console.print(f"{path}: registered md5 {md5['registered']}, reproduced {md5['reproduced']} ({verdict})")
    identical = sum(md5["registered"] == md5["reproduced"] for md5 in outputs.values())
    console.print(f"outputs: {identical} of {len(outputs)} byte-identical to the registered data versions")
    console.print(f"restored data versions: {', '.join(f'{p}={m}' for p, m in result['restored'].items())}")
    if result["workdir"]:
        console.print(f"worktree kept at {result['workdir']}")
    if not result["match"]:
        console.print(f"[bold red]not reproduced[/]: metrics differ beyond {tolerance:g}")
        raise typer.Exit(code=1)
    console.print(f"[bold green]reproduced[/]: {len(result['comparisons'])} metrics match within {tolerance:g}")


if __name__ == "__main__":
    app()
