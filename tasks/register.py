"""register: the fine-tuned model (and each quantized variant) as MLflow registry versions with lineage tags; the
new version becomes `challenger`, and `champion` only if it passes the gate against the current champion.

Reads models/finetune/, metrics/eval.json (+ metrics/quantize.json and models/quantized/<scheme>/ when present),
dvc.lock and params.yaml; returns the decision the runner writes to metrics/register.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from llmops.common import tracking
from llmops.common.errors import DataError
from llmops.common.results import StageResult
from llmops.training.candidate import candidate_model_dir
from llmops.common.stages import metrics_file
from llmops.params.evaluate import EvaluateConfig
from llmops.params.paths import PathsConfig
from llmops.params.register import RegisterConfig
from llmops.params.tracking import TrackingConfig
from llmops.registry import store as registry
from llmops.registry.gate import gate_metrics
from llmops.registry.promotion import (
    emit_champion_changed,
    lineage_tags,
    log_params_file,
    numeric_items,
    promote,
    register_model_dir,
    register_variants,
)


@contextmanager
def _mlflow_run(cfg: RegisterConfig, tracking_cfg: TrackingConfig, paths: PathsConfig) -> Iterator[str]:
    """The active MLflow run (the stage's, under `llmops stage register`), else a new one: registering needs a run."""
    import mlflow

    if (run := mlflow.active_run()) is not None:
        yield run.info.run_id
        return
    with tracking.stage_run(tracking_cfg, paths.root, "register", {"register": cfg.model_dump()}, {}) as run_id:
        yield run_id


def run(cfg: RegisterConfig, evaluate: EvaluateConfig, tracking_cfg: TrackingConfig, paths: PathsConfig) -> StageResult:
    import mlflow

    model_dir = candidate_model_dir(paths.finetune_model, paths.aligned_model, paths.metrics)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: no fine-tuned model (config.json missing); run the finetune stage first.")
    eval_file = metrics_file("evaluate", paths)
    if not eval_file.is_file():
        raise DataError(f"{eval_file}: not found; run the evaluate stage first (`dvc repro evaluate`).")
    eval_metrics = json.loads(eval_file.read_text())
    challenger = gate_metrics(eval_metrics)
    name = registry.model_name(cfg)
    store = registry.Store.of(tracking_cfg, paths)
    experiment_id = tracking.setup(tracking_cfg, paths.root)

    with _mlflow_run(cfg, tracking_cfg, paths) as run_id:
        sections = {"register": cfg.model_dump(mode="json"), "evaluate": evaluate.model_dump(mode="json")}
        lineage = lineage_tags(evaluate, paths, experiment_id, log_params_file(paths.root, sections))
        fingerprint = lineage["llmops.eval_data"]
        metric_tags = {f"llmops.metric.{k}": repr(v) for k, v in challenger.items()}
        metric_tags |= {f"llmops.metric.eval.{k}": repr(v) for k, v in numeric_items("", eval_metrics).items()}
        version, reused = register_model_dir(name, model_dir, cfg, store, lineage | metric_tags, registry.HF_ARTIFACT, challenger)
        version_id = str(version.version)
        registry.set_alias(name, "challenger", version_id, store)
        decision, champion_before = promote(name, version_id, challenger, fingerprint, model_dir, cfg, evaluate, paths, store)
        variants = register_variants(name, version_id, lineage, cfg, paths, store)
        champion_after = registry.alias_version(name, "champion", store)
        changed = champion_after != champion_before["version"]
        if not changed:
            event = "not sent: champion unchanged"
        elif not cfg.emit_events:
            event = "not sent: register.emit_events is false"
        else:
            event = emit_champion_changed(name, version_id)
        verdict = "promoted" if changed else "kept (already champion)" if champion_after == version_id else "refused"
        mlflow.set_tags({"llmops.gate.decision": verdict, "llmops.gate.reasons": "\n".join(decision.reasons), "llmops.registered_version": f"{name}@{version_id}"})
        describe(name, version_id, verdict, decision.reasons, challenger, variants, store)

    metrics = {
        "model_name": name,
        "version": version_id,
        "run_id": run_id,
        "reused_version": reused,
        "decision": verdict,
        "promoted": changed,
        "reasons": decision.reasons,
        "checks": decision.checks,
        "gate": cfg.gate.model_dump(),
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
    return StageResult(metrics=metrics, summary=summary, facts=("gate",))


def describe(name: str, version_id: str, verdict: str, reasons: list[str], challenger: dict[str, float], variants: dict, store) -> None:
    """Descriptions the registry UI shows: what the model is, and per version its gate numbers, verdict and variants."""
    client = registry.client(store)
    if not client.get_registered_model(name).description:
        client.update_registered_model(
            name, description="Code model trained by the llmops pipeline (pretrain -> finetune), versions registered by its register stage; "
            "`champion` is the gate's pick, `production` what the deploy flow serves."
        )
    numbers = ", ".join(f"{k} {v:.4g}" for k, v in challenger.items())
    quantized = "; quantized: " + ", ".join(f"{v['name']} v{v['version']}" for v in variants.values()) if variants else ""
    client.update_model_version(name, version_id, description=f"Gate {verdict}: {numbers}. {' '.join(reasons)}{quantized}")
