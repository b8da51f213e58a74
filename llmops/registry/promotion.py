"""Registering a model directory as a version with lineage tags, and the gate that moves `champion`.

"Evaluated on the same eval data": every version carries `llmops.eval_data`, a fingerprint of what evaluate
read (held-out tokens, fine-tune eval pairs, evaluate params). When the champion's fingerprint differs from
the challenger's, the champion is re-scored on the current data with the evaluate stage's own functions
(perplexity only when both share a tokenizer: per-token perplexity across vocabularies is not comparable),
and the result is cached on the champion version as tag `llmops.eval.<fingerprint>`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llmops.common import env
from llmops.common.fingerprints import directory_digest, dvc_lock_outputs, file_md5, files_digest, json_key
from llmops.common.stages import STAGES, metrics_file
from llmops.common.tracking import flatten, git_commit
from llmops.data.token_shards import MANIFEST
from llmops.params.evaluate import EvaluateConfig
from llmops.params.paths import PathsConfig
from llmops.params.register import RegisterConfig
from llmops.registry import store as registry
from llmops.registry.gate import GATE_METRICS, LM_EVAL_PREFIX, Decision, decide
from llmops.registry.store import Store

log = logging.getLogger("llmops.register")
EVENT = "llmops.champion.changed"
EVAL_KNOBS_NOT_IN_FINGERPRINT = ("workers",)  # how fast evaluate runs, not what it measures


def numeric_items(prefix: str, value: Any) -> dict[str, float]:
    return {k: float(v) for k, v in flatten(prefix, value).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def eval_data_fingerprint(evaluate: EvaluateConfig, paths: PathsConfig) -> str:
    """md5 of what evaluate's numbers depend on: the held-out tokens (meta.json, and the val shards as manifest.json
    lists them, each with its sha256, so no token file is read again), the fine-tune eval pairs, the evaluate params."""
    knobs = {k: v for k, v in evaluate.model_dump().items() if k not in EVAL_KNOBS_NOT_IN_FINGERPRINT}
    manifest = paths.tokens / MANIFEST
    val_shards = json.loads(manifest.read_text())["splits"]["val"] if manifest.is_file() else "<absent>"
    files = [paths.tokens / "meta.json", paths.instructions / "eval.jsonl"]
    return files_digest(files, extra=json.dumps({"evaluate": knobs, "val_shards": val_shards}, sort_keys=True))


def tokenizer_md5(model_dir: Path) -> str:
    return files_digest([Path(model_dir) / "tokenizer.json"])


def stage_run_ids(experiment_id: str, stages: list[str]) -> dict[str, str]:
    """The latest FINISHED MLflow run of each stage: the one whose outputs the workspace holds (DVC skips up-to-date
    stages, so a pipeline run's own children are not always the producers)."""
    import mlflow

    client = mlflow.MlflowClient()
    out = {}
    for stage in stages:
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.`llmops.stage` = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if runs:
            out[stage] = runs[0].info.run_id
    return out


def lineage_tags(evaluate: EvaluateConfig, paths: PathsConfig, experiment_id: str, params_md5: str) -> dict[str, str]:
    """The links from a version back to what made it: commit, pipeline and Prefect runs, params, eval data, DVC md5s, stage runs."""
    import mlflow

    parent = env.parent_run_id()
    flow_run = ""
    if parent:
        flow_run = mlflow.MlflowClient().get_run(parent).data.tags.get("prefect.flow_run_id", "")
    tags = {
        "llmops.git_commit": git_commit(paths.root),
        "llmops.pipeline_run_id": parent or "none (not run by the pipeline flow)",
        "llmops.prefect_flow_run_id": flow_run or "none",
        "llmops.params_md5": params_md5,
        "llmops.eval_data": eval_data_fingerprint(evaluate, paths),
    }
    tags |= {f"llmops.dvc.{path}": md5 for path, md5 in dvc_lock_outputs(paths.root / "dvc.lock").items()}
    tags |= {f"llmops.run.{stage}": run_id for stage, run_id in stage_run_ids(experiment_id, [s for s, stage in STAGES.items() if stage.kind not in ("registry", "report")]).items()}
    return tags


def quantized_dirs(cfg: RegisterConfig, paths: PathsConfig) -> dict[str, Path]:
    root = paths.quantized
    if not cfg.register_quantized or not root.is_dir():
        return {}
    return {p.name.lower(): p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def existing_version(name: str, model_md5: str, store: Store) -> Any | None:
    """A version of `name` already registered from the same model files: a re-run must not add a duplicate."""
    versions = registry.client(store).search_model_versions(f"name = '{name}' and tags.`llmops.model_md5` = '{model_md5}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def register_model_dir(
    name: str, model_dir: Path, cfg: RegisterConfig, store: Store, tags: dict[str, str], artifact: str, metrics: dict[str, float]
) -> tuple[Any, bool]:
    """(version, reused): a new version of `name`, or the one already registered from these files with its tags updated."""
    model_md5 = directory_digest(model_dir)
    tags = {**tags, "llmops.model_md5": model_md5}
    if (version := existing_version(name, model_md5, store)) is not None:
        client = registry.client(store)
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version.version), key, value)
        return client.get_model_version(name, str(version.version)), True
    flavor = cfg.log_transformers_flavor
    return registry.log_version(name, model_dir, store, tags=tags, artifact=artifact, flavor=flavor, metrics=metrics), False


def tagged_gate_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The gate metrics register tagged a version with: perplexity, pass@1, humaneval_nll, doctest_pass_rate and every
    lm_eval.<task>.<metric>."""
    prefix = "llmops.metric."
    names = {key[len(prefix) :]: value for key, value in tags.items() if key.startswith(prefix)}
    return {name: float(value) for name, value in names.items() if name in GATE_METRICS or name.startswith(LM_EVAL_PREFIX)}


def champion_metrics(
    champion: Any, fingerprint: str, challenger_dir: Path, cfg: RegisterConfig, evaluate: EvaluateConfig, paths: PathsConfig, store: Store
) -> tuple[dict[str, float] | None, str]:
    """The champion's gate metrics on the eval data `fingerprint` names, and where they came from."""
    tags = champion.tags or {}
    if tags.get("llmops.eval_data") == fingerprint:
        return tagged_gate_metrics(tags), "version tags (same eval data)"
    cached = tags.get(f"llmops.eval.{fingerprint}")
    if cached:
        return json.loads(cached), "an earlier re-score on this eval data (version tag)"
    if not cfg.gate.reevaluate_champion:
        return None, "evaluated on other eval data and register.gate.reevaluate_champion is false"
    metrics = reevaluate(champion, challenger_dir, evaluate, paths, store)
    registry.client(store).set_model_version_tag(champion.name, str(champion.version), f"llmops.eval.{fingerprint}", json.dumps(metrics))
    return metrics, "re-scored now on the current eval data"


def reevaluate(champion: Any, challenger_dir: Path, evaluate: EvaluateConfig, paths: PathsConfig, store: Store) -> dict[str, float]:
    """The champion's gate metrics on the current eval data, with the evaluate stage's own functions: perplexity and
    the HumanEval solution NLL (per token) when both share a tokenizer, pass@1. Not the doctest pass rate: its prompts
    come from the corpus, which register does not read, so that check runs only between versions on the same data."""
    from llmops.evaluation.generation import load_model
    from llmops.evaluation.suite import held_out_perplexity, humaneval

    ref = registry.resolve(f"{champion.name}@{champion.version}", store)
    metrics: dict[str, float] = {}
    same_tokenizer = tokenizer_md5(ref.path) == tokenizer_md5(challenger_dir)
    if same_tokenizer:
        metrics["perplexity"] = held_out_perplexity(ref.path, paths.tokens, evaluate, f"register: perplexity (champion v{champion.version})")["perplexity"]
    if evaluate.max_problems:
        model, tokenizer = load_model(ref.path)
        scores, _ = humaneval(model, tokenizer, evaluate)
        if "pass_at_1" in scores:
            metrics["pass_at_1"] = float(scores["pass_at_1"])
        if same_tokenizer:
            metrics["humaneval_nll"] = float(scores["nll_bits_per_token"])
    return metrics


def emit_champion_changed(name: str, version: str) -> str:
    """Best effort: send the Prefect event to the Prefect API in PREFECT_API_URL; returns what happened.

    Without PREFECT_API_URL, Prefect would start a throwaway ephemeral server just for this event, so none is sent.
    """
    import httpx

    api = env.prefect_api_url()
    if not api:
        return "not sent: no Prefect API (PREFECT_API_URL unset)"
    try:
        httpx.get(f"{api.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        log.warning("register: Prefect API %s unreachable, %s event not sent: %s", api, EVENT, exc)
        return f"not sent: Prefect API {api} unreachable ({type(exc).__name__})"
    try:
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # Prefect reads its settings once per process: pin the API checked above, whatever was loaded before.
        with temporary_settings(updates={PREFECT_API_URL: api}):
            event = emit_event(
                event=EVENT, resource={"prefect.resource.id": f"mlflow.model.{name}"}, payload={"name": name, "version": version}
            )
            EventsWorker.drain_all(timeout=10)
    except Exception as exc:  # an event is a notification: it never undoes a decision already made
        log.warning("register: %s event failed: %s", EVENT, exc)
        return f"not sent: {type(exc).__name__}: {exc}"
    return f"sent ({event.id})" if event is not None else "not sent: Prefect events are disabled"


def log_params_file(root: Path, sections: dict[str, Any]) -> str:
    """params.yaml (under the repository `root`) as an artifact of the register run; returns its md5 (`md5sum`).

    Called from Python without a params.yaml (tests), the given sections are logged as params.json instead.
    """
    import mlflow

    params_file = Path(root) / "params.yaml"
    if params_file.is_file():
        mlflow.log_artifact(str(params_file))
        return file_md5(params_file)
    mlflow.log_dict(sections, "params.json")
    return json_key(sections, length=32)


def promote(
    name: str, version_id: str, challenger: dict[str, float], fingerprint: str, model_dir: Path,
    cfg: RegisterConfig, evaluate: EvaluateConfig, paths: PathsConfig, store: Store,
) -> tuple[Decision, dict[str, Any]]:
    """Run the gate for `version_id` against the current champion and move `champion` when it passes."""
    champion_before = registry.alias_version(name, "champion", store)
    info: dict[str, Any] = {"version": champion_before}
    if champion_before == version_id:
        return Decision(True, [f"version {version_id} (the same model files) is already champion"]), info
    if champion_before is None:
        decision = decide(challenger, None, cfg.gate)
    else:
        champion = registry.get_version(name, champion_before, store)
        numbers, source = champion_metrics(champion, fingerprint, model_dir, cfg, evaluate, paths, store)
        info |= {"metrics": numbers or {}, "source": source}
        if numbers is None:
            decision = Decision(False, [f"champion v{champion_before} {source}: the champion stays"])
        else:
            decision = decide(challenger, numbers, cfg.gate)
    if decision.promote:
        registry.set_alias(name, "champion", version_id, store)
    return decision, info


def register_variants(
    name: str, version_id: str, lineage: dict[str, str], cfg: RegisterConfig, paths: PathsConfig, store: Store
) -> dict[str, dict[str, str]]:
    """Each paths.quantized/<scheme>/ as a version of <name>-<scheme> linked by tag llmops.base_version, its logged model
    carrying the variant's own numbers (perplexity, pass@1, size, speed from metrics/quantize.json) so it compares
    side by side with the base in the MLflow UI. No gate ran on a variant, so it takes no gate alias: it is reached
    through its base (`resolve(NAME@champion, quantized=SCHEME)`)."""
    import mlflow

    quantize_file = metrics_file("quantize", paths)
    quantize_metrics = json.loads(quantize_file.read_text()) if quantize_file.is_file() else {}
    variants = {}
    for scheme, qdir in quantized_dirs(cfg, paths).items():
        numbers = quantize_metrics[scheme] if isinstance(quantize_metrics.get(scheme), dict) else quantize_metrics
        tags = lineage | {"llmops.base_version": version_id, "llmops.base_model": name, "llmops.quantization": scheme}
        tags |= {f"llmops.metric.quantize.{k}": repr(v) for k, v in numeric_items("", numbers).items()}
        qname = registry.model_name(cfg, scheme)
        own = numeric_items("", numbers) if isinstance(quantize_metrics.get(scheme), dict) else {}
        # A run of its own, nested in the register run: MLflow links a run's metrics to every model logged in it,
        # and the variant's logged model must show its numbers, not the unquantized model's.
        with mlflow.start_run(run_name=f"register-{scheme}", nested=True, tags={"llmops.stage": f"register-{scheme}"}):
            if own:
                mlflow.log_metrics(own)
            qversion, _ = register_model_dir(qname, qdir, cfg, store, tags, f"{registry.HF_ARTIFACT}-{scheme}", own)
        qversion_id = str(qversion.version)
        registry.client(store).update_model_version(
            qname, qversion_id, description=f"{scheme} of {name} v{version_id} (llmops quantize stage); not gated, serve it through its base."
        )
        variants[scheme] = {"name": qname, "version": qversion_id}
    return variants
