"""The `llmops` command: run the pipeline flow, run one stage (what dvc.yaml calls), open the MLflow UI."""

from __future__ import annotations


from llmops.common import env

env.set_offline()  # before any library is imported: nothing may phone home

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
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
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
    from llmops.common.tracking import tracking_uri

    params = load_params(params_file)
    ran = [s for s, r in result["stages"].items() if not r["cached"]]
    cached = [s for s, r in result["stages"].items() if r["cached"]]
    console.print(f"\n[bold green]pipeline done[/]: ran {', '.join(ran) or 'nothing'}; up to date: {', '.join(cached) or 'none'}")
    if result["accounting"]:
        a = result["accounting"]
        console.print(f"records: {a['records_in']} in = {a['kept']} kept + {a['quarantined']} quarantined + {a['duplicates']} duplicates")
    console.print(f"MLflow run {result['mlflow_run_id']} at {tracking_uri(params.tracking, params.paths.root)}  ->  `llmops ui` (or `mlflow ui --backend-store-uri {params.tracking.uri}`)")
    rel = params.paths.as_params()
    console.print(f"data: {rel['raw']}, {rel['validated']}, {rel['quarantine']}, {rel['dedup']}, {rel['duplicates']}, {rel['tokens']}, {rel['instructions']}")
    console.print(f"models: {rel['tokenizer']}, {rel['pretrain_model']}, {rel['finetune_model']} (LoRA merged), {rel['adapter']}, {rel['quantized']}/<scheme> (table: {rel['reports']}/quantize/table.md)")
    console.print(f"metrics: `dvc metrics show` ({rel['metrics']}/*.json); Data Docs: {rel['reports']}/validate/data_docs/index.html")
    if "register" in result["stages"] and (registered := result["stages"]["register"]["metrics"]):
        console.print(
            f"registry: {registered['model_name']} version {registered['version']} is challenger, gate {registered['decision']}; "
            f"champion is version {registered['champion_after']}  ->  `llmops models`"
        )
    if deploy_after and params.serve.after_run and to_stage is None:
        _deploy_champion(params, keep_serving)
    if monitor_after and params.monitor.after_run and to_stage is None:
        console.print("monitor: the drift monitor on the held-out batch (a healthy run is not flagged)")
        monitor(batch=None, heldout=True, retrain=False, repo=repo)


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
    if result.summary:  # worker processes of a distributed stage leave the summary to rank 0
        console.print(result.summary)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    params_file: Annotated[Path, typer.Option("--params", help="params.yaml to read.")] = Path("params.yaml"),
) -> None:
    """Start the MLflow UI on the project's tracking store."""
    from llmops.params.load import load_params
    from llmops.common.tracking import tracking_uri

    params = load_params(params_file)
    uri = tracking_uri(params.tracking, params.paths.root)
    console.print(f"MLflow UI on http://{host}:{port} for {uri} (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]))


@app.command()
def models(
    name: Annotated[str, typer.Option(help="Registered model name (default: register.model_name).")] = "",
    params_file: Annotated[Path, typer.Option("--params", help="params.yaml to read.")] = Path("params.yaml"),
) -> None:
    """List the registered model's versions (and its quantized variants) with aliases, gate metrics and lineage."""
    from rich.table import Table

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
    table = Table(*rows[0])
    for row in rows:
        table.add_row(*row.values())
    out = Console()
    out.width = max(out.width, 160)  # ids and hashes stay whole when piped
    out.print(table)


def _store(params):
    from llmops.registry.store import Store

    return Store.of(params.tracking, params.paths)


def _deploy_champion(params, keep_serving: bool) -> None:
    """The end of `llmops run`: the deploy flow on the champion, or a note when the gate has not made one yet."""
    from llmops.registry.store import alias_version, model_name

    name = model_name(params.register)
    if alias_version(name, "champion", _store(params)) is None:
        console.print(f"deploy: {name} has no champion yet (no version passed the register gate), nothing to serve")
        return
    try:
        from flows.deploy import deploy as deploy_flow

        result = deploy_flow(model=f"{name}@champion", keep_serving=keep_serving, repo_dir=str(params.paths.root))
    except LlmopsError as exc:
        _fail(exc)
    console.print(result["summary"])


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
    from llmops.serving.backends import choose_backend, inspect_model
    from llmops.serving.server import api_key, start

    _stop_servers_on_sigterm()
    try:
        from llmops.registry.store import ENDPOINT_TAG, clear_endpoint, model_name, record_endpoint, resolve

        params = load_params(params_file)
        cfg, store = params.serve, _store(params)
        spec = model or f"{model_name(params.register)}@production"
        ref = resolve(spec, store, quantized=quantized)
        served = inspect_model(ref.path, ref.name or ref.path.name)
        chosen = choose_backend(cfg.backend if backend == "auto" else backend)
        console.print(f"starting {chosen} for {spec} ({ref.path}); waiting up to {cfg.health_timeout_s:.0f} s for /health")
        server = start(served, cfg, chosen, api_key(cfg, params.paths.root), port=port or cfg.port, log_dir=params.paths.reports / "serve", cwd=params.paths.root)
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
) -> None:
    """Drift monitor (the Prefect `monitor` flow): compare a batch with the training data; metrics/monitor.json + an MLflow run."""
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
        result = monitor_flow(batch=batch, retrain=retrain, repo_dir=str(repo))
    except LlmopsError as exc:
        _fail(exc)
    from rich.table import Table

    table = Table(title=f"drift checks: batch {result['batch_id']}")
    for column in ("check", "score", "threshold", "verdict"):
        table.add_column(column)
    for name, check in result["metrics"]["checks"].items():
        score = "n/a" if check["score"] is None else f"{check['score']:.4f}"
        bound = ("<= " if check["kind"] == "max" else ">= ") + str(check["threshold"])
        table.add_row(name, score, bound, "[red]FLAGGED[/]" if check["flagged"] else "[green]ok[/]")
    console.print(table)
    verdict = "[bold red]DRIFT[/]" if result["drift"] else "[bold green]no drift[/]"
    console.print(f"{verdict}; metrics/monitor.json; MLflow run {result['mlflow_run_id']} (experiment {params.monitor.experiment})")
    if "retrain" in result:
        r = result["retrain"]
        console.print(f"retrained via {r['mode']} with {r['batch_file']}; champion {r['champion_before']} -> {r['champion_after']}")


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
