"""The Prefect deploy flow: resolve a registered model, serve it, smoke- and load-test it, then move the `production` alias.

resolve (registry -> local HF directory) -> launch backend + key-checking proxy -> /health
-> smoke test (completion + chat) -> load test (N clients x M streamed requests) -> gate
(error rate, p95 latency) -> alias `production` -> stop (unless keep_serving). Every number goes
to an MLflow run of the tracking experiment, tagged with the model's name and version. On any
failure the server is stopped, `production` stays where it was, and the flow fails with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from llmops.params.load import Params, load_params
from llmops.params.serve import ServeConfig
from llmops.common.errors import ServeError
from llmops.common.tracking import flatten, git_commit, setup
from llmops.serving.server import Server

PRODUCTION = "production"
CHAMPION = "champion"


def default_spec(params: Params) -> str:
    from llmops.registry.store import model_name

    return f"{model_name(params.register)}@{CHAMPION}"


def gate_failures(load: dict[str, Any], cfg: ServeConfig) -> list[str]:
    """Why the load test does not pass the thresholds in params (empty = it passes)."""
    reasons = []
    if load["error_rate"] > cfg.max_error_rate:
        reasons.append(f"error rate {load['error_rate']:.3f} ({load['errors']}/{load['requests']}) > serve.max_error_rate {cfg.max_error_rate}: {'; '.join(load['first_errors'])}")
    if cfg.max_p95_latency_s and load["latency_p95_s"] > cfg.max_p95_latency_s:
        reasons.append(f"p95 latency {load['latency_p95_s']:.2f} s > serve.max_p95_latency_s {cfg.max_p95_latency_s}")
    return reasons


# NO_CACHE: the server object carries the API key; nothing about it may be hashed or persisted.
@task(cache_policy=NO_CACHE)
def smoke(server: Server, cfg: ServeConfig) -> dict[str, float]:
    from llmops.serving.probes import smoke_test

    result = smoke_test(server.openai_base_url, server.api_key, server.model.name, cfg.smoke_max_tokens, cfg.request_timeout_s)
    get_run_logger().info("smoke test passed: completion %.2f s, chat %.2f s", result["completion_latency_s"], result["chat_latency_s"])
    return result


@task(cache_policy=NO_CACHE)
def load(server: Server, cfg: ServeConfig) -> dict[str, Any]:
    from llmops.serving.probes import load_test

    result = load_test(
        server.openai_base_url, server.api_key, server.model.name,
        clients=cfg.load_clients, requests=cfg.load_requests, max_tokens=cfg.load_max_tokens, timeout_s=cfg.request_timeout_s,
    )  # fmt: skip
    get_run_logger().info(
        "load test: %d clients x %d requests, %d errors, p50 %.2f s, p95 %.2f s, TTFT p50 %.2f s, %.1f tokens/s",
        cfg.load_clients, result["requests"], result["errors"], result["latency_p50_s"], result["latency_p95_s"], result["ttft_p50_s"], result["tokens_per_s"],
    )  # fmt: skip
    return result


@flow(name="deploy")
def deploy(
    model: str = "", backend: str = "auto", quantized: str = "", port: int = 0, keep_serving: bool = False, repo_dir: str = ".", pipeline_run_id: str = ""
) -> dict[str, Any]:
    """Serve `model` (NAME@ALIAS, NAME@VERSION or a local HF directory; "" = <model_name>@champion), test it, and promote it to `production`.

    `backend` "auto" takes serve.backend from params.yaml; `port` 0 takes serve.port (0 there = a free port).
    `pipeline_run_id`: the MLflow run of the pipeline that built the model; the deploy run nests under it.
    With serve.capture on, a server that stays up captures production traffic; the deploy's own smoke and load
    tests are never captured.
    """
    import mlflow
    from prefect.runtime import flow_run

    from llmops.registry.store import DEPLOY_RUN_TAG, Store, alias_version, client, record_endpoint, resolve, set_alias
    from llmops.serving.backends import choose_backend, inspect_model, with_draft
    from llmops.serving.server import api_key, start

    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    params = load_params(repo / "params.yaml")
    cfg, store = params.serve, Store.of(params.tracking, params.paths)
    if not keep_serving:
        cfg = cfg.model_copy(update={"capture": False})  # the server only answers the deploy's own tests
    spec = model or default_spec(params)
    ref = resolve(spec, store, quantized=quantized)
    served = with_draft(inspect_model(ref.path, ref.name or Path(ref.path).name), cfg, params.paths)
    chosen = choose_backend(cfg.backend if backend == "auto" else backend)
    key = api_key(cfg, repo)
    previous = alias_version(ref.name, PRODUCTION, store) if ref.name else None
    logger.info("deploying %s (%s) with %s; %s is now %s", spec, ref.path, chosen, PRODUCTION, previous or "unset")

    experiment_id = setup(params.tracking, repo)
    tags = {
        "llmops.deploy": "true",
        "llmops.model_name": ref.name,
        "llmops.model_version": ref.version,
        "llmops.model_spec": spec,
        "llmops.model_path": str(ref.path),
        "llmops.backend": chosen,
        "llmops.quantized": quantized,
        "llmops.git_commit": git_commit(repo),
        "llmops.production_before": previous or "",
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
    }
    server: Server | None = None
    with mlflow.start_run(experiment_id=experiment_id, run_name="deploy", tags=tags, parent_run_id=pipeline_run_id or None) as run:
        mlflow.log_params(flatten("serve", cfg.model_dump()))
        try:
            server = start(served, cfg, chosen, key, port=port or cfg.port, log_dir=params.paths.reports / "serve", cwd=repo, model_version=ref.version)
            mlflow.log_param("backend_command", " ".join(server.command))
            mlflow.log_metric("health_wait_s", server.health_wait_s)
            smoke_result = smoke(server, cfg)
            mlflow.log_metrics({f"smoke.{k}": v for k, v in smoke_result.items()})
            load_result = load(server, cfg)
            mlflow.log_metrics({f"load.{k}": float(v) for k, v in load_result.items() if isinstance(v, int | float)})
            if reasons := gate_failures(load_result, cfg):
                raise ServeError(f"{spec}: the load test failed the gate, {PRODUCTION} stays at {previous or 'unset'}: " + "; ".join(reasons))
            if ref.name:
                set_alias(ref.name, PRODUCTION, ref.version, store)
                client(store).set_model_version_tag(ref.name, ref.version, DEPLOY_RUN_TAG, run.info.run_id)
                if keep_serving:
                    record_endpoint(ref.name, ref.version, server.url, store)
                logger.info("%s: %s -> version %s (was %s)", ref.name, PRODUCTION, ref.version, previous or "unset")
            else:
                logger.info("%s is a local directory, not a registered version: no alias to move", ref.path)
            mlflow.set_tag("llmops.deploy.status", "promoted" if ref.name else "passed")
        except BaseException as exc:
            if server is not None:
                server.stop()
            mlflow.set_tag("llmops.deploy.status", "failed")
            mlflow.set_tag("llmops.deploy.failure", f"{type(exc).__name__}: {exc}"[:4000])
            raise
        if not keep_serving:
            server.stop()
    summary = (
        f"deploy {spec}: {chosen} served, smoke-tested, load-tested ({load_result['requests']} requests from {cfg.load_clients} clients, "
        f"{load_result['errors']} errors, p95 {load_result['latency_p95_s']:.2f} s, {load_result['tokens_per_s']:.1f} tokens/s); "
        + (f"{PRODUCTION} -> {ref.name} v{ref.version}" if ref.name else "local directory, no alias moved")
        + (f"; serving at {server.url}" if keep_serving else "; server stopped")
    )
    logger.info(summary)
    return {
        "model": spec, "name": ref.name, "version": ref.version, "path": str(ref.path), "backend": chosen,
        "url": server.url if keep_serving else "", "pids": server.pids() if keep_serving else [],
        "production_before": previous, "mlflow_run_id": run.info.run_id, "smoke": smoke_result, "load": load_result, "summary": summary,
    }  # fmt: skip
