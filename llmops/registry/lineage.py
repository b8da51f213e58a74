"""Lineage of a registered model version, read from its tags: endpoint -> version -> runs -> data md5s -> source -> params.

The register stage writes the links (`llmops.git_commit`, `llmops.pipeline_run_id`, `llmops.prefect_flow_run_id`,
`llmops.params_md5`, `llmops.dvc.<path>`, `llmops.run.<stage>`, `llmops.metric.*`), the deploy flow
`llmops.deploy_run`, and a server of ours `llmops.endpoint` while it serves the version; this module only reads them
back, checks that each linked run exists and the endpoint answers, and lays the chain out for `llmops lineage`
(a tree, or JSON).
"""

from __future__ import annotations

from typing import Any

from llmops.common.tracking import run_url as server_run_url
from llmops.registry import store as registry
from llmops.registry.store import Store

DVC_PREFIX = "llmops.dvc."
RUN_PREFIX = "llmops.run."
METRIC_PREFIX = "llmops.metric."
HEALTH_TIMEOUT_S = 3.0


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI on a tracking server; a `runs:/` URI on a local store."""
    return server_run_url(uri, experiment_id, run_id) or f"runs:/{run_id}"


def describe_run(client: Any, uri: str, run_id: str) -> dict[str, Any]:
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # a deleted or foreign run: show the id and why it cannot be followed
        return {"run_id": run_id, "status": f"not found ({type(exc).__name__})"}
    return {
        "run_id": run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "url": run_url(uri, run.info.experiment_id, run_id),
        "git_commit": run.data.tags.get("llmops.git_commit", ""),
    }


def endpoint_status(url: str) -> str:
    """Whether the recorded server answers now: a server killed without stopping cleanly leaves its tag behind."""
    import httpx

    try:
        code = httpx.get(f"{url.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S).status_code
    except httpx.HTTPError as exc:
        return f"not answering ({type(exc).__name__}): stopped, or not reachable from here"
    return "answering /health" if code == 200 else f"/health answered {code}"


def lineage(spec: str, store: Store) -> dict[str, Any]:
    """The chain for `spec` (NAME@ALIAS or NAME@VERSION) as a JSON-able dict."""
    name, ref = registry.parse_spec(spec)
    version = registry.get_version(name, ref, store)
    client = registry.client(store)
    uri = store.uri
    tags = dict(version.tags or {})
    model = client.get_registered_model(name)
    aliases = sorted(a for a, v in (model.aliases or {}).items() if str(v) == str(version.version))
    url = tags.get(registry.ENDPOINT_TAG)
    deploy_run = tags.get(registry.DEPLOY_RUN_TAG)
    pipeline_run = tags.get("llmops.pipeline_run_id", "none")
    stage_runs = {k[len(RUN_PREFIX) :]: v for k, v in sorted(tags.items()) if k.startswith(RUN_PREFIX)}
    return {
        "spec": spec,
        "endpoint": {"url": url, "status": endpoint_status(url)} if url else None,
        "model": {"name": name, "version": str(version.version), "aliases": aliases, "source": version.source, "run_id": version.run_id},
        "deploy_run": describe_run(client, uri, deploy_run) if deploy_run else None,
        "register_run": describe_run(client, uri, version.run_id),
        "pipeline_run": None if pipeline_run.startswith("none") else describe_run(client, uri, pipeline_run),
        "stage_runs": {stage: describe_run(client, uri, run_id) for stage, run_id in stage_runs.items()},
        "data": {k[len(DVC_PREFIX) :]: v for k, v in sorted(tags.items()) if k.startswith(DVC_PREFIX)},
        "source": {"git_commit": tags.get("llmops.git_commit", "unknown"), "prefect_flow_run_id": tags.get("llmops.prefect_flow_run_id", "none")},
        "params": {"params_md5": tags.get("llmops.params_md5", "unknown"), "params_file": f"runs:/{version.run_id}/params.yaml"},
        "metrics": {k[len(METRIC_PREFIX) :]: v for k, v in sorted(tags.items()) if k.startswith(METRIC_PREFIX)},
        "eval_data": tags.get("llmops.eval_data", ""),
        "tracking_uri": uri,
    }


def render_tree(chain: dict[str, Any]) -> Any:
    """A rich Tree: endpoint at the top, down to params."""
    from rich.tree import Tree

    model, endpoint = chain["model"], chain["endpoint"]
    if endpoint:
        served = f"{endpoint['url']} ({endpoint['status']})"
    elif chain["deploy_run"]:
        served = f"not served now (deploy run {chain['deploy_run']['run_id']} tested it, moved production and stopped its server)"
    else:
        served = "not served (no server of ours has served this version)"
    top = Tree(f"[bold]endpoint[/]: {served}")
    version = top.add(f"[bold]{model['name']} version {model['version']}[/] aliases: {', '.join(model['aliases']) or 'none'}")
    runs = version.add("[bold]runs[/]")
    described = [("deploy", chain["deploy_run"]), ("register", chain["register_run"]), ("pipeline", chain["pipeline_run"])]
    for label, run in described + list(chain["stage_runs"].items()):
        if run:
            runs.add(f"{label}: {run['run_id']} {run.get('status', '')} {run.get('url', '')}")
    data = version.add("[bold]data (DVC md5)[/]")
    for path, md5 in chain["data"].items():
        data.add(f"{path}: {md5}")
    source = version.add(f"[bold]source[/]: git {chain['source']['git_commit']}, Prefect flow run {chain['source']['prefect_flow_run_id']}")
    source.add(f"[bold]params[/]: md5 {chain['params']['params_md5']} ({chain['params']['params_file']})")
    metrics = version.add("[bold]gate metrics[/]")
    for key, value in chain["metrics"].items():
        metrics.add(f"{key} = {value}")
    return top
