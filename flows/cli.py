"""The `llmops` command: run the pipeline flow, run one stage (what dvc.yaml calls), open the MLflow UI."""

from __future__ import annotations

import os

# Nothing may phone home, and these must be set before any of the libraries is imported.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TOKENIZERS_PARALLELISM": "true",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from tasks.common.errors import LlmopsError  # noqa: E402

app = typer.Typer(
    help="llmops: data -> training -> evaluation -> serving, versioned by DVC, tracked by MLflow, orchestrated by Prefect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def _fail(exc: LlmopsError) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=1)


@app.command()
def run(
    from_stage: Annotated[str | None, typer.Option("--from", help="First stage to run (default: the first in dvc.yaml).")] = None,
    to_stage: Annotated[str | None, typer.Option("--to", help="Last stage to run (default: the last).")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a param for this run, e.g. --set dedup.threshold=0.8 (written to params.yaml so DVC sees it).")
    ] = None,
    repo: Annotated[Path, typer.Option(help="Repository root holding dvc.yaml and params.yaml.")] = Path("."),
) -> None:
    """Run the pipeline flow (Prefect): each dvc.yaml stage, skipped when DVC says it is up to date."""
    try:
        from flows.pipeline import pipeline

        result = pipeline(from_stage=from_stage, to_stage=to_stage, overrides=overrides or [], repo_dir=str(repo))
    except LlmopsError as exc:
        _fail(exc)
    from tasks.common.config import load_params
    from tasks.common.tracking import tracking_uri

    params = load_params(repo / "params.yaml")
    ran = [s for s, r in result["stages"].items() if not r["cached"]]
    cached = [s for s, r in result["stages"].items() if r["cached"]]
    console.print(f"\n[bold green]pipeline done[/]: ran {', '.join(ran) or 'nothing'}; up to date: {', '.join(cached) or 'none'}")
    if result["accounting"]:
        a = result["accounting"]
        console.print(f"records: {a['records_in']} in = {a['kept']} kept + {a['quarantined']} quarantined + {a['duplicates']} duplicates")
    console.print(f"MLflow run {result['mlflow_run_id']} at {tracking_uri(params.tracking, repo)}  ->  `llmops ui` (or `mlflow ui --backend-store-uri {params.tracking.uri}`)")
    console.print(f"data: {params.paths.raw}, {params.paths.validated}, {params.paths.quarantine}, {params.paths.dedup}, {params.paths.duplicates}, {params.paths.tokens}, {params.paths.instructions}")
    console.print(f"models: {params.paths.tokenizer}, {params.paths.pretrain_model}, {params.paths.finetune_model} (LoRA merged), {params.paths.adapter}")
    console.print(f"metrics: `dvc metrics show` ({params.paths.metrics}/*.json); Data Docs: {params.paths.reports}/validate/data_docs/index.html")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="Stage name from dvc.yaml, e.g. ingest, validate, dedup, tokenize.")],
    params_file: Annotated[Path, typer.Option("--params", help="params.yaml to read.")] = Path("params.yaml"),
    track: Annotated[bool, typer.Option(help="Log the stage to MLflow.")] = True,
) -> None:
    """Run one stage in-process (this is what dvc.yaml calls); prefer `dvc repro` or `llmops run`."""
    try:
        from tasks.common.config import load_params
        from tasks.stages import run_stage

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
    from tasks.common.config import load_params
    from tasks.common.tracking import tracking_uri

    params = load_params(params_file)
    uri = tracking_uri(params.tracking)
    console.print(f"MLflow UI on http://{host}:{port} for {uri} (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]))


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
        from tasks.common.config import load_params

        params = load_params(repo / "params.yaml")
        if heldout:
            from tasks.monitor import export_heldout

            export_heldout(params, repo)
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
        from tasks import lineage as lineage_mod
        from tasks.common.config import load_params

        chain = lineage_mod.lineage(spec, load_params(params_file))
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
        from tasks import reproduce as reproduce_mod
        from tasks.common.config import load_params

        result = reproduce_mod.reproduce(spec, load_params(repo / "params.yaml"), repo=repo, tolerance=tolerance, keep=keep)
    except LlmopsError as exc:
        _fail(exc)
    table = Table(title=f"reproduce {result['spec']} at {result['commit'][:12]} ({result['params']})")
    for column in ("stage", "metric", "registered", "reproduced", "match"):
        table.add_column(column)
    for c in result["comparisons"]:
        shown = "missing" if c.reproduced is None else f"{c.reproduced:.8g}"
        table.add_row(c.stage, c.metric, f"{c.registered:.8g}", shown, "[green]yes[/]" if c.match else "[red]NO[/]")
    Console().print(table)
    for path, md5 in result["models"].items():
        diff = md5["differing_files"]
        if md5["registered"] == md5["reproduced"]:
            verdict = "bitwise identical"
        elif diff is None:
            verdict = "differs (file listings not in the cache)"
        else:
            weights = [f for f in diff if f.endswith((".safetensors", ".bin")) and f != "training_args.bin"]
            verdict = f"{'weights differ' if weights else 'weights bitwise identical'}; files that differ: {', '.join(diff)}"
        console.print(f"{path}: registered md5 {md5['registered']}, reproduced {md5['reproduced']} ({verdict})")
    console.print(f"restored data versions: {', '.join(f'{p}={m}' for p, m in result['restored'].items())}")
    if result["workdir"]:
        console.print(f"worktree kept at {result['workdir']}")
    if not result["match"]:
        console.print(f"[bold red]not reproduced[/]: metrics differ beyond {tolerance:g}")
        raise typer.Exit(code=1)
    console.print(f"[bold green]reproduced[/]: {len(result['comparisons'])} metrics match within {tolerance:g}")


if __name__ == "__main__":
    app()
