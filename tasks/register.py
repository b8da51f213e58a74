"""Register: the fine-tuned model (and each quantized variant) as MLflow registry versions with lineage tags; the
new version becomes `challenger`, and `champion` only if it passes the gate against the current champion.

Reads models/finetune/, metrics/eval.json (+ metrics/quantize.json and models/quantized/<scheme>/ when present),
dvc.lock and params.yaml; returns the decision that `run_stage` writes to metrics/register.json.

"Evaluated on the same eval data": every version carries `llmops.eval_data`, a fingerprint of what evaluate
read (held-out tokens, fine-tune eval pairs, evaluate params). When the champion's fingerprint differs from
the challenger's, the champion is re-scored on the current data with the evaluate stage's own functions
(perplexity only when both share a tokenizer: per-token perplexity across vocabularies is not comparable),
and the result is cached on the champion version as tag `llmops.eval.<fingerprint>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks import registry
from tasks.common.config import PARAMS_FILE, GateConfig, Params
from tasks.common.errors import DataError
from tasks.common.result import StageResult

log = logging.getLogger("llmops.register")
EVENT = "llmops.champion.changed"
GATE_METRICS = ("perplexity", "pass_at_1")
EVAL_KNOBS_NOT_IN_FINGERPRINT = ("workers",)  # how fast evaluate runs, not what it measures


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str]  # one line per check: the numbers and the rule
    checks: dict[str, bool] = field(default_factory=dict)  # check name -> passed (only the checks that ran)


def decide(challenger: dict[str, float], champion: dict[str, float] | None, gate: GateConfig) -> Decision:
    """Whether `challenger` replaces `champion`, both scored on the same eval data.

    A check runs when both sides have its metric; the challenger wins only if every check that ran passes
    and at least one ran. No champion at all: the challenger wins.
    """
    if champion is None:
        return Decision(True, ["no champion yet: the first version becomes champion"])
    reasons, checks = [], {}
    if "pass_at_1" in challenger and "pass_at_1" in champion:
        floor = champion["pass_at_1"] + gate.min_pass_at_1_delta
        checks["pass_at_1"] = challenger["pass_at_1"] >= floor - 1e-12
        reasons.append(
            f"pass@1 {challenger['pass_at_1']:.4f} vs champion {champion['pass_at_1']:.4f}: needs >= {floor:.4f} "
            f"(min_pass_at_1_delta {gate.min_pass_at_1_delta:+g}) -> {'ok' if checks['pass_at_1'] else 'FAIL'}"
        )
    else:
        reasons.append("pass@1 not compared: not measured for both (evaluate.max_problems 0, or a re-score without HumanEval)")
    if "perplexity" in challenger and "perplexity" in champion:
        ceiling = champion["perplexity"] * (1 + gate.max_perplexity_increase)
        checks["perplexity"] = challenger["perplexity"] <= ceiling
        reasons.append(
            f"perplexity {challenger['perplexity']:.4f} vs champion {champion['perplexity']:.4f}: needs <= {ceiling:.4f} "
            f"(max_perplexity_increase {gate.max_perplexity_increase:g}) -> {'ok' if checks['perplexity'] else 'FAIL'}"
        )
    else:
        reasons.append("perplexity not compared: not measured for both on the same tokenization")
    if not checks:
        return Decision(False, [*reasons, "no gate metric could be compared: the champion stays"], checks)
    return Decision(all(checks.values()), reasons, checks)


def gate_metrics(eval_metrics: dict[str, Any]) -> dict[str, float]:
    """The gate's numbers from metrics/eval.json."""
    out = {"perplexity": float(eval_metrics["perplexity"]["perplexity"])}
    if "pass_at_1" in (eval_metrics.get("humaneval") or {}):
        out["pass_at_1"] = float(eval_metrics["humaneval"]["pass_at_1"])
    return out


def numeric_items(prefix: str, value: Any) -> dict[str, float]:
    from tasks.common.tracking import flatten

    return {k: float(v) for k, v in flatten(prefix, value).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def md5_files(paths: list[Path], extra: str = "") -> str:
    digest = hashlib.md5()
    for path in paths:
        digest.update(path.name.encode())
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        else:
            digest.update(b"<absent>")
    digest.update(extra.encode())
    return digest.hexdigest()


def eval_data_fingerprint(params: Params) -> str:
    """md5 of what evaluate's numbers depend on: the held-out tokens, the fine-tune eval pairs, the evaluate params."""
    tokens = Path(params.paths.tokens)
    knobs = {k: v for k, v in params.evaluate.model_dump().items() if k not in EVAL_KNOBS_NOT_IN_FINGERPRINT}
    files = [tokens / "meta.json", tokens / "val.bin", Path(params.paths.instructions) / "eval.jsonl"]
    return md5_files(files, json.dumps(knobs, sort_keys=True))


def model_fingerprint(model_dir: Path) -> str:
    """md5 of the model directory's files, read now (dvc.lock may describe an older workspace when run by hand)."""
    return md5_files(sorted(p for p in Path(model_dir).iterdir() if p.is_file()))


def tokenizer_md5(model_dir: Path) -> str:
    return md5_files([Path(model_dir) / "tokenizer.json"])


def dvc_outputs(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """Every output path in dvc.lock -> its md5 (the data version of each stage output)."""
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    return {out["path"]: out["md5"] for stage in (lock.get("stages") or {}).values() for out in stage.get("outs") or [] if out.get("md5")}


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


def lineage_tags(params: Params, experiment_id: str, params_md5: str) -> dict[str, str]:
    import mlflow

    from tasks.common.tracking import PARENT_RUN_ENV, git_commit
    from tasks.stages import STAGES

    parent = os.environ.get(PARENT_RUN_ENV, "")
    flow_run = ""
    if parent:
        flow_run = mlflow.MlflowClient().get_run(parent).data.tags.get("prefect.flow_run_id", "")
    tags = {
        "llmops.git_commit": git_commit(),
        "llmops.pipeline_run_id": parent or "none (not run by the pipeline flow)",
        "llmops.prefect_flow_run_id": flow_run or "none",
        "llmops.params_md5": params_md5,
        "llmops.eval_data": eval_data_fingerprint(params),
    }
    tags |= {f"llmops.dvc.{path}": md5 for path, md5 in dvc_outputs().items()}
    tags |= {f"llmops.run.{stage}": run_id for stage, run_id in stage_run_ids(experiment_id, [s for s in STAGES if s != "register"]).items()}
    return tags


def quantized_dirs(params: Params) -> dict[str, Path]:
    root = Path(params.paths.quantized)
    if not params.register.register_quantized or not root.is_dir():
        return {}
    return {p.name.lower(): p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def existing_version(name: str, model_md5: str, params: Params) -> Any | None:
    """A version of `name` already registered from the same model files: a re-run must not add a duplicate."""
    versions = registry.client(params).search_model_versions(f"name = '{name}' and tags.`llmops.model_md5` = '{model_md5}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None


def register_model_dir(
    name: str, model_dir: Path, params: Params, tags: dict[str, str], artifact: str, metrics: dict[str, float]
) -> tuple[Any, bool]:
    """(version, reused): a new version of `name`, or the one already registered from these files with its tags updated."""
    model_md5 = model_fingerprint(model_dir)
    tags = {**tags, "llmops.model_md5": model_md5}
    if (version := existing_version(name, model_md5, params)) is not None:
        client = registry.client(params)
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version.version), key, value)
        return client.get_model_version(name, str(version.version)), True
    flavor = params.register.log_transformers_flavor
    return registry.log_version(name, model_dir, params, tags=tags, artifact=artifact, flavor=flavor, metrics=metrics), False


def champion_metrics(champion: Any, fingerprint: str, challenger_dir: Path, params: Params) -> tuple[dict[str, float] | None, str]:
    """The champion's gate metrics on the eval data `fingerprint` names, and where they came from."""
    tags = champion.tags or {}
    if tags.get("llmops.eval_data") == fingerprint:
        return {m: float(tags[f"llmops.metric.{m}"]) for m in GATE_METRICS if f"llmops.metric.{m}" in tags}, "version tags (same eval data)"
    cached = tags.get(f"llmops.eval.{fingerprint}")
    if cached:
        return json.loads(cached), "an earlier re-score on this eval data (version tag)"
    if not params.register.gate.reevaluate_champion:
        return None, "evaluated on other eval data and register.gate.reevaluate_champion is false"
    metrics = reevaluate(champion, challenger_dir, params)
    registry.client(params).set_model_version_tag(champion.name, str(champion.version), f"llmops.eval.{fingerprint}", json.dumps(metrics))
    return metrics, "re-scored now on the current eval data"


def reevaluate(champion: Any, challenger_dir: Path, params: Params) -> dict[str, float]:
    """The champion's gate metrics on the current eval data, with the evaluate stage's own functions."""
    from tasks import evaluate
    from tasks.evaluation.generation import load_model

    ref = registry.resolve(f"{champion.name}@{champion.version}", params)
    metrics: dict[str, float] = {}
    if tokenizer_md5(ref.path) == tokenizer_md5(challenger_dir):
        metrics["perplexity"] = evaluate.held_out_perplexity(ref.path, params, f"register: perplexity (champion v{champion.version})")["perplexity"]
    if params.evaluate.max_problems:
        model, tokenizer = load_model(ref.path)
        humaneval, _ = evaluate.humaneval(model, tokenizer, params.evaluate)
        if "pass_at_1" in humaneval:
            metrics["pass_at_1"] = float(humaneval["pass_at_1"])
    return metrics


def emit_champion_changed(name: str, version: str) -> str:
    """Best effort: send the Prefect event to the Prefect API in PREFECT_API_URL; returns what happened.

    Without PREFECT_API_URL, Prefect would start a throwaway ephemeral server just for this event, so none is sent.
    """
    import httpx

    api = os.environ.get("PREFECT_API_URL", "")
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


@contextmanager
def _mlflow_run(params: Params) -> Iterator[str]:
    """The active MLflow run (the stage's, under `llmops stage register`), else a new one: registering needs a run."""
    import mlflow

    from tasks.common import tracking

    if (run := mlflow.active_run()) is not None:
        yield run.info.run_id
        return
    with tracking.stage_run(params.tracking, "register", {"register": params.register.model_dump()}, []) as run_id:
        yield run_id


def file_md5(path: Path) -> str:
    """What `md5sum FILE` prints: the llmops.params_md5 of a version, checked again by reproduce."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def log_params_file(params: Params) -> str:
    """params.yaml as an artifact of the register run; returns its md5 (file_md5)."""
    import mlflow

    params_file = Path(PARAMS_FILE)
    if params_file.is_file():
        mlflow.log_artifact(str(params_file))
        return file_md5(params_file)
    dumped = params.model_dump(by_alias=True)  # called from Python without a params.yaml (tests)
    mlflow.log_dict(dumped, "params.json")
    return hashlib.md5(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def gate(name: str, version_id: str, challenger: dict[str, float], fingerprint: str, model_dir: Path, params: Params) -> tuple[Decision, dict[str, Any]]:
    """Run the gate for `version_id` against the current champion and move `champion` when it passes."""
    champion_before = registry.alias_version(name, "champion", params)
    info: dict[str, Any] = {"version": champion_before}
    if champion_before == version_id:
        return Decision(True, [f"version {version_id} (the same model files) is already champion"]), info
    if champion_before is None:
        decision = decide(challenger, None, params.register.gate)
    else:
        champion = registry.get_version(name, champion_before, params)
        numbers, source = champion_metrics(champion, fingerprint, model_dir, params)
        info |= {"metrics": numbers or {}, "source": source}
        if numbers is None:
            decision = Decision(False, [f"champion v{champion_before} {source}: the champion stays"])
        else:
            decision = decide(challenger, numbers, params.register.gate)
    if decision.promote:
        registry.set_alias(name, "champion", version_id, params)
    return decision, info


def register_variants(name: str, version_id: str, lineage: dict[str, str], params: Params) -> dict[str, dict[str, str]]:
    """Each paths.quantized/<scheme>/ as a version of <name>-<scheme> linked by tag llmops.base_version; it takes the
    base version's aliases (challenger, and champion when the base is champion)."""
    from tasks.stages import metrics_path

    quantize_file = metrics_path("quantize", params)
    quantize_metrics = json.loads(quantize_file.read_text()) if quantize_file.is_file() else {}
    is_champion = registry.alias_version(name, "champion", params) == version_id
    variants = {}
    for scheme, qdir in quantized_dirs(params).items():
        numbers = quantize_metrics[scheme] if isinstance(quantize_metrics.get(scheme), dict) else quantize_metrics
        tags = lineage | {"llmops.base_version": version_id, "llmops.base_model": name, "llmops.quantization": scheme}
        tags |= {f"llmops.metric.quantize.{k}": repr(v) for k, v in numeric_items("", numbers).items()}
        qname = registry.model_name(params, scheme)
        qversion, _ = register_model_dir(qname, qdir, params, tags, f"{registry.HF_ARTIFACT}-{scheme}", {})
        qversion_id = str(qversion.version)
        registry.set_alias(qname, "challenger", qversion_id, params)
        if is_champion:
            registry.set_alias(qname, "champion", qversion_id, params)
        variants[scheme] = {"name": qname, "version": qversion_id}
    return variants


def run(params: Params) -> StageResult:
    import mlflow

    from tasks.common import tracking
    from tasks.stages import metrics_path

    model_dir = Path(params.paths.finetune_model)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: no fine-tuned model (config.json missing); run the finetune stage first.")
    eval_file = metrics_path("evaluate", params)
    if not eval_file.is_file():
        raise DataError(f"{eval_file}: not found; run the evaluate stage first (`dvc repro evaluate`).")
    eval_metrics = json.loads(eval_file.read_text())
    challenger = gate_metrics(eval_metrics)
    name = registry.model_name(params)
    experiment_id = tracking.setup(params.tracking)

    with _mlflow_run(params) as run_id:
        lineage = lineage_tags(params, experiment_id, log_params_file(params))
        fingerprint = lineage["llmops.eval_data"]
        metric_tags = {f"llmops.metric.{k}": repr(v) for k, v in challenger.items()}
        metric_tags |= {f"llmops.metric.eval.{k}": repr(v) for k, v in numeric_items("", eval_metrics).items()}
        version, reused = register_model_dir(name, model_dir, params, lineage | metric_tags, registry.HF_ARTIFACT, challenger)
        version_id = str(version.version)
        registry.set_alias(name, "challenger", version_id, params)
        decision, champion_before = gate(name, version_id, challenger, fingerprint, model_dir, params)
        variants = register_variants(name, version_id, lineage, params)
        champion_after = registry.alias_version(name, "champion", params)
        changed = champion_after != champion_before["version"]
        if not changed:
            event = "not sent: champion unchanged"
        elif not params.register.emit_events:
            event = "not sent: register.emit_events is false"
        else:
            event = emit_champion_changed(name, version_id)
        verdict = "promoted" if changed else "kept (already champion)" if champion_after == version_id else "refused"
        mlflow.set_tags({"llmops.gate.decision": verdict, "llmops.gate.reasons": "\n".join(decision.reasons), "llmops.registered_version": f"{name}@{version_id}"})

    metrics = {
        "model_name": name,
        "version": version_id,
        "run_id": run_id,
        "reused_version": reused,
        "decision": verdict,
        "promoted": changed,
        "reasons": decision.reasons,
        "checks": decision.checks,
        "gate": params.register.gate.model_dump(),
        "eval_data": fingerprint,
        "challenger": challenger,
        "champion_before": champion_before,
        "champion_after": champion_after,
        "quantized": variants,
        "event": event,
    }
    quantized = ", ".join(f"{v['name']}@{v['version']}" for v in variants.values())
    summary = (
        f"register: {name} version {version_id}{' (same files as before)' if reused else ''} is challenger; gate {verdict}"
        f" ({'; '.join(decision.reasons)}); champion v{champion_after}{f', quantized {quantized}' if variants else ''}; event {event}"
    )
    return StageResult(metrics=metrics, summary=summary)
