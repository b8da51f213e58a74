"""Drift monitor: stage a new batch in a side area, compare it with the training data and the served model, write metrics/monitor.json.

The batch is ingested and validated with the data library the stages call into `monitor.workdir/<batch id>/`
(never one of the training data paths), tokenized with the training tokenizer, and compared with
`reference_stats.json` (written by tokenize with the same function) and with the training split:

- token-length distribution: KS statistic between the binned CDFs (tokenize's fixed log-spaced bins);
- unigram distribution: Jensen-Shannon divergence (base 2, so 0..1);
- unk + byte-fallback rate, minus the reference rate;
- validation pass rate under validate's rules;
- share of batch documents that near-duplicate a training document (dedup's MinHash LSH settings);
- the monitored model's perplexity on the batch over its perplexity on the held-out split;
- for captured serving traffic only (llmops/monitoring/traffic.py): prompt token lengths against finetune's
  training prompts (KS), the share of requests the proxy refused, and p95 latency and per-request tokens/s
  against the deploy flow's load test.

Each score has a threshold in params.yaml (`monitor`); `drift` is true when any check is past its
threshold. Results go to metrics/monitor.json, an HTML report, and one MLflow run per batch. A tracked
check is also an entry in the ledger (llmops/monitoring/ledger.py): the ledger's order is each check's
MLflow step and the x axis of the score history, and a scheduled run skips batch files the ledger holds.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from llmops.common.errors import ConfigError, DataError, LlmopsError
from llmops.common.fingerprints import directory_digest, dvc_lock_outputs, files_digest, texts_digest
from llmops.common.io import atomic_dir, atomic_write_bytes, atomic_write_json, read_records, write_records
from llmops.common.stages import MONITOR_METRICS, metrics_file
from llmops.data.expectations import validate_records
from llmops.monitoring.checks import Check, binned_ks, build_checks, jensen_shannon, ks_critical_value, near_duplicate_share, psi
from llmops.monitoring.ledger import BatchAlreadyChecked, Ledger, file_key, record
from llmops.monitoring.report import history_png, render_report, token_label
from llmops.monitoring.traffic import CAPTURE_FIELDS, TRAFFIC_CHECKS, captured_records, load_test_reference, traffic_scores, training_prompts
from llmops.data.sources import ingest, is_hf_dataset, resolve_sources
from llmops.data.minhash import load_signatures
from llmops.data.tokenizer import REFERENCE_STATS, encode_and_pack, is_validation_doc, reference_stats, validation_mask
from llmops.params.load import Params

log = logging.getLogger("llmops.monitor")
REPORT_FILE = "report.html"
HISTORY_FILE = "drift_history.png"
CHARS_PER_TOKEN_BOUND = 12  # BPE on code and prose stays well under this; only bounds how much text is encoded for perplexity
# params.yaml `paths` that hold training data or models: the side area may be none of them and sit in none of them.
TRAINING_PATHS = ("raw", "validated", "quarantine", "dedup", "duplicates", "tokens", "tokenizer", "instructions", "pretrain_model", "finetune_model", "adapter")


@dataclass
class MonitorResult:
    batch: str
    batch_id: str
    batch_dir: Path
    checks: list[Check]
    info: dict[str, Any]  # counts, timings, which model was scored
    model: str
    applied_glob: str = ""  # how the batch spec was read: the glob that chose its files
    files: list[str] = field(default_factory=list)  # the files checked
    skipped_files: list[str] = field(default_factory=list)  # files of the spec left out: the ledger had checked them
    batch_time: str = ""  # ISO time the batch was complete (its newest file's mtime)
    step: int | None = None  # position in the ledger (tracked checks only)
    mlflow_run_id: str = ""
    report: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        return any(c.flagged for c in self.checks)

    @property
    def summary(self) -> str:
        flagged = [c.name for c in self.checks if c.flagged]
        verdict = f"DRIFT ({', '.join(flagged)})" if flagged else "no drift"
        skipped = f", {len(self.skipped_files)} already-checked file(s) skipped" if self.skipped_files else ""
        return (
            f"monitor: batch {self.batch_id} ({self.info['docs']} docs, {self.info['batch_tokens']:,} tokens, {self.info['bytes'] / 1e6:.2f} MB; "
            f"{len(self.files)} file(s) of {self.applied_glob}{skipped}) -> {verdict}; {self.info['seconds']:.1f} s; report {self.report}"
        )


def batch_fingerprint(files: list[Path]) -> str:
    """12 hex digits of sha256 over the batch's file names and bytes: the same batch gets the same id."""
    return files_digest(sorted(files), algorithm="sha256")[:12]


def check_side_area(params: Params) -> None:
    """The side area and the batches folder must not be, contain, or sit inside a training data path."""
    root = params.paths.root
    for key in ("workdir", "batches_dir"):
        side = (root / getattr(params.monitor, key)).resolve()
        for name in TRAINING_PATHS:
            data = (root / getattr(params.paths, name)).resolve()
            if side == data or data in side.parents or side in data.parents:
                raise ConfigError(
                    f"params.yaml: monitor.{key}={getattr(params.monitor, key)!r} overlaps paths.{name}={getattr(params.paths, name)!r}; "
                    "the monitor must never write into training data. Point it at a folder of its own (e.g. data/monitor)."
                )


def _token_stats(tokenizer: Any, texts: list[str], bins: int, desc: str) -> tuple[dict[str, Any], np.ndarray]:
    ids, lengths = encode_and_pack(tokenizer, texts, 256, desc)
    return reference_stats(tokenizer, ids, lengths, bins), lengths


def monitored_model(params: Params) -> tuple[Path | None, str]:
    """The model whose perplexity is checked and how it was found: monitor.model, else @production, @champion, finetune_model."""
    root = params.paths.root
    spec = params.monitor.model
    if spec and (root / spec / "config.json").exists():
        return root / spec, spec
    from llmops.registry import store as registry

    store = registry.Store.of(params.tracking, params.paths)

    if spec:
        ref = registry.resolve(params.monitor.model, store)
        return ref.path, f"{params.monitor.model} ({ref.path})"
    name = registry.model_name(params.register)
    for alias in ("production", "champion"):
        try:
            ref = registry.resolve(f"{name}@{alias}", store)
        except LlmopsError as exc:
            log.info("monitor: %s@%s not usable (%s)", name, alias, exc)
            continue
        return ref.path, f"{name}@{alias} (version {ref.version})"
    local = params.paths.finetune_model
    if (local / "config.json").exists():
        return local, f"{params.paths.finetune_model} (no {name}@production or @champion in the registry)"
    return None, f"none: no {name}@production or @champion and no {params.paths.finetune_model}/config.json"


def _perplexity(model: Any, tokenizer: Any, texts: list[str], seq_len: int, limit: int, desc: str) -> tuple[float, int]:
    from llmops.evaluation.generation import perplexity
    from llmops.training.data import TokenBlocks

    if limit:  # encode only what is scored: documents up to ~CHARS_PER_TOKEN_BOUND chars per token of the budget
        budget, chosen = limit * CHARS_PER_TOKEN_BOUND, []
        for text in texts:
            chosen.append(text)
            budget -= len(text)
            if budget <= 0:
                break
        texts = chosen
    ids, _ = encode_and_pack(tokenizer, texts, 256, desc)
    if limit:
        ids = ids[:limit]
    blocks = TokenBlocks(ids, min(seq_len, len(ids)), seed=None)
    result = perplexity(model, blocks, batch_size=16, desc=desc)
    return result.perplexity, result.tokens


def heldout_key(model_dir: Path, heldout_texts: list[str], seq_len: int, limit: int) -> str:
    """What the held-out perplexity depends on: the model's files (weights, config, tokenizer), the held-out text, the
    block length and the token budget. Every batch checked against one model and one held-out split shares it."""
    extra = f"{seq_len}:{limit}:{texts_digest(heldout_texts)}"
    return directory_digest(model_dir, algorithm="sha256", recursive=True, extra=extra)[:16]


def perplexity_ratio(params: Params, batch_texts: list[str], heldout_texts: list[str]) -> tuple[float, dict[str, Any], str]:
    """(batch perplexity / held-out perplexity, details, note). Both sides use the model's own tokenizer and the same block length.

    The held-out side costs as much as the batch side (both score up to monitor.perplexity_tokens) and is the same for
    every batch until the model or the split changes: it is kept under `monitor.workdir/heldout_perplexity/<key>.json`
    and reused.
    """
    from llmops.evaluation.generation import load_model

    model_dir, label = monitored_model(params)
    root = params.paths.root
    if model_dir is None:
        return float("nan"), {"model": label}, f"not computed: {label}"
    model, tokenizer = load_model(model_dir)
    seq_len = min(params.evaluate.seq_len, getattr(model.config, "max_position_embeddings", params.evaluate.seq_len))
    limit = params.monitor.perplexity_tokens
    batch_ppl, batch_tokens = _perplexity(model, tokenizer, batch_texts, seq_len, limit, "monitor: perplexity (batch)")
    cached = root / params.monitor.workdir / "heldout_perplexity" / f"{heldout_key(model_dir, heldout_texts, seq_len, limit)}.json"
    reused = cached.exists()
    if reused:
        held = json.loads(cached.read_text())
        held_ppl, held_tokens = held["perplexity"], held["tokens"]
    else:
        held_ppl, held_tokens = _perplexity(model, tokenizer, heldout_texts, seq_len, limit, "monitor: perplexity (held-out)")
        atomic_write_json(cached, {"perplexity": held_ppl, "tokens": held_tokens, "model": label})
    details = {
        "model": label, "batch_perplexity": batch_ppl, "heldout_perplexity": held_ppl, "batch_tokens_scored": batch_tokens,
        "heldout_tokens_scored": held_tokens, "heldout_perplexity_reused": reused,
    }  # fmt: skip
    return batch_ppl / held_ppl, details, label


def training_split(params: Params) -> tuple[list[str], list[str], Any]:
    """(train texts, held-out texts, the train documents' MinHash signatures or None) of data/dedup, split exactly as
    tokenize splits them; the signatures are the ones dedup saved, so the train split is never hashed again."""
    table = read_records(params.paths.dedup)
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    held_out = validation_mask(ids, params.tokenize)
    sigs = load_signatures(params.paths.dedup, params.dedup, len(ids))
    train = [t for t, v in zip(texts, held_out, strict=True) if not v]
    heldout = [t for t, v in zip(texts, held_out, strict=True) if v]
    return train, heldout, (sigs[~held_out] if sigs is not None else None)


def stage_batch(params: Params, batch: str | list[str], side: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Ingest and validate the batch into the side area with the stages' own code: (raw table, validated table, counts)."""
    ingest(params.ingest.model_copy(update={"source": batch}), side / "raw", params.paths.root)
    raw = read_records(side / "raw")
    validated, quarantined, _ = validate_records(raw, params.validate_, side / "data_docs")
    with atomic_dir(side / "quarantine") as tmp:
        write_records(tmp, quarantined, shard_max_bytes=params.validate_.shard_max_bytes)
    with atomic_dir(side / "validated") as tmp:
        write_records(tmp, validated, shard_max_bytes=params.validate_.shard_max_bytes)
    counts = {"docs": raw.num_rows, "valid_docs": validated.num_rows, "quarantined": quarantined.num_rows}
    return raw, validated, counts


def batch_files(batch: str, file_glob: str, root: Path) -> tuple[list[Path], str]:
    """(the files `batch` names, the glob that chose them). A directory is read with ingest.file_glob, like ingest does;
    a file is itself; anything else is taken as a glob."""
    files = [f for _, _, f in resolve_sources(batch, file_glob, root)] if batch else []
    given = Path(batch).expanduser()
    path = given if given.is_absolute() else root / given
    if path.is_dir() and not is_hf_dataset(path):
        applied = f"{batch.rstrip('/')}/{file_glob} (ingest.file_glob={file_glob!r} on the directory)"
    elif path.exists():
        applied = f"{batch} (one file)" if path.is_file() else f"{batch} (a dataset directory)"
    else:
        applied = f"{batch} (a glob)"
    return files, applied


def _batch_time(files: list[Path]) -> float:
    """When the batch was complete: its newest file's mtime (epoch seconds)."""
    return max(f.stat().st_mtime for f in files)


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="seconds")


def run(params: Params, batch: str, *, track: bool = True, skip_seen: bool = False) -> MonitorResult:
    """Compare `batch` (a file, directory, glob, JSONL or Parquet: whatever ingest reads) with the training data.

    `track` records the check: an MLflow run in monitor.experiment and an entry in the ledger (monitor.workdir/
    ledger.json), whose order gives each check its step. `skip_seen` leaves out the batch's files the ledger holds
    unchanged and raises BatchAlreadyChecked when none is left.
    """
    from transformers import AutoTokenizer

    started, started_epoch_s = time.perf_counter(), time.time()
    root = params.paths.root
    cfg = params.monitor
    check_side_area(params)
    files, applied_glob = batch_files(batch, params.ingest.file_glob, root)
    if not files:
        raise DataError(
            f"monitor --batch {batch!r}: matched no files; it was read as {applied_glob}. Give a file, a .jsonl or .parquet, "
            f"or a glob that names the files (e.g. '{batch.rstrip('/')}/**/*.txt' for text files in a directory)."
        )
    ledger = Ledger(root / cfg.workdir)
    keys = {f: file_key(f) for f in files}
    skipped: list[Path] = []
    if skip_seen:
        files, skipped = ledger.seen(keys)
        if not files:
            raise BatchAlreadyChecked(
                f"monitor: all {len(skipped)} file(s) of {applied_glob} were already checked (ledger {ledger.path}); nothing new. "
                "`--force` checks them again.",
                skipped,
            )
        if skipped:
            log.info("monitor: %d of %d file(s) of %s already checked (ledger %s); checking the %d new one(s)", len(skipped), len(keys), applied_glob, ledger.path, len(files))
    batch_id = batch_fingerprint(files)
    side = root / cfg.workdir / batch_id
    side.mkdir(parents=True, exist_ok=True)
    reference_file = params.paths.tokens / REFERENCE_STATS
    if not reference_file.exists():
        raise DataError(f"{reference_file}: no reference statistics; run the pipeline up to tokenize first (`llmops run --to tokenize`).")
    reference = json.loads(reference_file.read_text())

    part_started = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(part: str) -> None:
        nonlocal part_started
        now = time.perf_counter()
        seconds[part] = now - part_started
        part_started = now

    raw, validated, counts = stage_batch(params, [str(f) for f in files] if skipped else batch, side)
    lap("ingest_validate")
    texts = [t for t in validated.column("text").to_pylist() if t]
    scores: dict[str, float] = {"validation_pass_rate": counts["valid_docs"] / counts["docs"] if counts["docs"] else float("nan")}
    notes: dict[str, str] = {}
    info: dict[str, Any] = {**counts, "bytes": sum(len(t.encode("utf-8", "surrogatepass")) for t in raw.column("text").to_pylist() if t)}

    tokenizer = AutoTokenizer.from_pretrained(str(params.paths.tokenizer))
    stats, _ = _token_stats(tokenizer, texts, params.tokenize.length_histogram_bins, "monitor: tokenize batch")
    if stats["doc_length_bin_edges"] != reference["doc_length_bin_edges"]:
        raise DataError(f"{reference_file}: length bins differ from tokenize.length_histogram_bins; re-run tokenize (`dvc repro tokenize`).")
    atomic_write_json(side / "batch_stats.json", stats)
    scores["token_length_ks"] = binned_ks(reference["doc_length_histogram"], stats["doc_length_histogram"])
    info["token_length_psi"] = psi(reference["doc_length_histogram"], stats["doc_length_histogram"])
    scores["unigram_js"] = jensen_shannon(reference["unigram_counts"], stats["unigram_counts"])
    batch_oov = stats["unk_rate"] + stats["byte_fallback_rate"]
    scores["oov_rate_increase"] = batch_oov - (reference["unk_rate"] + reference["byte_fallback_rate"])
    info.update(batch_tokens=stats["tokens"], batch_oov_rate=batch_oov)
    lap("token_stats")

    train_texts, heldout_texts, train_sigs = training_split(params)
    scores["near_duplicate_share"] = near_duplicate_share(params.dedup, train_texts, texts, train_sigs) if texts else float("nan")
    info["near_duplicates_reused_signatures"] = train_sigs is not None
    lap("near_duplicates")
    if texts:
        scores["perplexity_ratio"], ppl_info, model_label = perplexity_ratio(params, texts, heldout_texts)
        info.update({k: v for k, v in ppl_info.items() if k != "model"})
        if math.isnan(scores["perplexity_ratio"]):
            notes["perplexity_ratio"] = model_label
    else:
        model_label = "not scored: no valid documents in the batch"
        for name in ("token_length_ks", "unigram_js", "near_duplicate_share", "perplexity_ratio"):
            notes[name] = "no valid documents in the batch"
    lap("perplexity")
    prompt_ks_critical = traffic_checks(params, raw, tokenizer, reference, scores, notes, info)
    lap("traffic")
    ks_critical = ks_critical_value(sum(reference["doc_length_histogram"]), sum(stats["doc_length_histogram"]), cfg.length_ks_alpha)
    checks = build_checks(scores, cfg, notes, ks_critical, prompt_ks_critical)
    info.update({f"seconds_{part}": value for part, value in seconds.items()})
    info["seconds"] = time.perf_counter() - started
    info["mb_per_s"] = info["bytes"] / 1e6 / info["seconds"]
    result = MonitorResult(
        batch=batch, batch_id=batch_id, batch_dir=side, checks=checks, info=info, model=model_label,
        applied_glob=applied_glob, files=[params.paths.relative(f) for f in files], skipped_files=[params.paths.relative(f) for f in skipped],
        batch_time=_iso(_batch_time(files)),
    )  # fmt: skip
    result.report = side / REPORT_FILE

    def write_outputs(history: bytes | None) -> None:
        labels = functools.partial(token_label, tokenizer)
        atomic_write_bytes(result.report, render_report(result, reference, stats, labels, history).encode())
        result.metrics = monitor_metrics(result)
        atomic_write_json(metrics_file("monitor", params.paths), result.metrics)
        atomic_write_json(side / MONITOR_METRICS, result.metrics)

    if not track:
        write_outputs(None)
        return result
    with ledger.update() as state:
        result.step = len(state["batches"])
        entry = {
            "step": result.step, "batch_id": batch_id, "batch": batch, "files": result.files, "batch_time": result.batch_time,
            "checked_at": _iso(time.time()), "drift": result.drift, "flagged": [c.name for c in checks if c.flagged],
            "scores": {c.name: None if math.isnan(c.score) else c.score for c in checks}, "thresholds": {c.name: c.threshold for c in checks},
        }  # fmt: skip
        history = history_png(state["batches"] + [entry])
        atomic_write_bytes(side / HISTORY_FILE, history)
        write_outputs(history)
        result.mlflow_run_id = log_to_mlflow(params, result, started_epoch_s, _batch_time(files))
        entry["mlflow_run_id"] = result.mlflow_run_id
        record(state, [keys[f] for f in files], entry)
    return result


def traffic_checks(params: Params, raw: Any, tokenizer: Any, reference: dict[str, Any], scores: dict[str, float], notes: dict[str, str], info: dict[str, Any]) -> float:
    """Score the traffic checks into `scores`/`notes`/`info` when the batch is captured traffic (else say why not);
    returns the prompt-length KS critical value for the batch's size (NaN when not computed)."""
    records = captured_records(raw.column("text").to_pylist(), raw.column("meta").to_pylist())
    if not records:
        for name in TRAFFIC_CHECKS:
            notes[name] = f"not computed: no record carries the capture fields ({', '.join(CAPTURE_FIELDS)}); not serving traffic"
        return float("nan")
    info["traffic_records_without_capture_fields"] = raw.num_rows - len(records)
    load_test, load_test_label = load_test_reference(params)
    traffic, traffic_notes, traffic_info = traffic_scores(records, load_test, load_test_label)
    scores.update(traffic)
    notes.update(traffic_notes)
    info.update(traffic_info)
    prompts = [r["text"] for r in records if not r["refused"] and r["text"]]
    train_prompts = training_prompts(params.paths.instructions)
    if not train_prompts:
        notes["prompt_length_ks"] = f"not computed: no training prompts at {params.paths.relative(params.paths.instructions)}/train.jsonl (run finetune)"
        return float("nan")
    if not prompts:
        notes["prompt_length_ks"] = "not computed: every captured request was refused"
        return float("nan")
    bins = params.tokenize.length_histogram_bins
    batch_prompts, _ = _token_stats(tokenizer, prompts, bins, "monitor: tokenize prompts")
    training, _ = _token_stats(tokenizer, train_prompts, bins, "monitor: tokenize training prompts")
    scores["prompt_length_ks"] = binned_ks(training["doc_length_histogram"], batch_prompts["doc_length_histogram"])
    info.update(traffic_prompts=len(prompts), training_prompts=len(train_prompts))
    return ks_critical_value(len(train_prompts), len(prompts), params.monitor.length_ks_alpha)


def monitor_metrics(result: MonitorResult) -> dict[str, Any]:
    """metrics/monitor.json: each check's score, threshold and verdict, and the overall `drift`."""
    return {
        "batch": result.batch,
        "batch_id": result.batch_id,
        "drift": result.drift,
        "model": result.model,
        "glob": result.applied_glob,
        "files": result.files,
        "skipped_files": result.skipped_files,
        "batch_time": result.batch_time,
        "step": result.step,
        "checks": {
            c.name: {"score": None if math.isnan(c.score) else c.score, "threshold": c.threshold, "kind": c.kind, "flagged": c.flagged, **({"note": c.note} if c.note else {})}
            for c in result.checks
        },
        **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.info.items()},
    }


def log_to_mlflow(params: Params, result: MonitorResult, started_epoch_s: float, batch_epoch_s: float) -> str:
    """One run per batch in the monitor experiment, spanning the check (it starts when the check started).

    Every check's score is logged at step = the ledger's step (0, 1, 2, ... in the order batches were checked) with the
    metric timestamp = the batch's time: the run chart's "Step" axis lists batches evenly and readably, its "Time (wall)"
    axis places them at their real time (an epoch-seconds step would read as 1.7e9 and bunch batches of one day
    together). The score history across batches is also a plot artifact, drift_history.png.
    """
    root = params.paths.root
    import mlflow

    from llmops.common import tracking

    experiment_id = tracking.setup(params.tracking.model_copy(update={"experiment": params.monitor.experiment}), root)
    tags = {
        "llmops.monitor": "true",
        "llmops.batch": result.batch,
        "llmops.batch_id": result.batch_id,
        "llmops.batch_glob": result.applied_glob,
        "llmops.batch_time": result.batch_time,
        "llmops.monitor.step": str(result.step),
        "llmops.drift": str(result.drift).lower(),
        "llmops.model": result.model,
        "llmops.git_commit": tracking.git_commit(root),
        "llmops.reference.tokens_md5": dvc_lock_outputs(root / "dvc.lock").get(params.paths.relative(params.paths.tokens), "not in dvc.lock"),
        "llmops.flagged": ",".join(c.name for c in result.checks if c.flagged),
        "llmops.summary": result.summary,
    }
    run = mlflow.MlflowClient().create_run(experiment_id, start_time=int(started_epoch_s * 1000), tags=tags, run_name=f"monitor-{result.batch_id}")
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_params({f"monitor.{k}": v for k, v in params.monitor.model_dump().items()})
        scores = {c.name: c.score for c in result.checks if not math.isnan(c.score)}
        numeric = {k: float(v) for k, v in result.info.items() if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))}
        mlflow.log_metrics({**scores, **numeric, "drift": float(result.drift)}, step=result.step, timestamp=int(batch_epoch_s * 1000))
        mlflow.log_artifact(str(result.batch_dir / MONITOR_METRICS))
        mlflow.log_artifact(str(result.batch_dir / HISTORY_FILE))
        if result.report:
            mlflow.log_artifact(str(result.report))
        return run.info.run_id


# ---- report --------------------------------------------------------------------------------------


def export_heldout(params: Params) -> Path:
    """Write tokenize's held-out split (documents never trained on) as JSONL at monitor.heldout_batch."""
    root = params.paths.root
    table = read_records(params.paths.dedup)
    rows = [
        json.dumps({"id": doc_id, "text": text}, ensure_ascii=False)
        for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True)
        if is_validation_doc(doc_id, params.tokenize.val_fraction, params.tokenize.split_seed)
    ]
    if not rows:
        raise DataError(f"{params.paths.dedup}: no document falls in the held-out split (tokenize.val_fraction={params.tokenize.val_fraction}).")
    out = root / params.monitor.heldout_batch
    atomic_write_bytes(out, ("\n".join(rows) + "\n").encode())
    return out


def add_to_sources(params: Params, result: MonitorResult) -> tuple[Path, list[str]]:
    """Copy the staged batch (raw records, ids prefixed so they never collide with the corpus) to monitor.batches_dir.

    Returns the file and the `ingest.source` override that adds it to the training sources.
    """
    root = params.paths.root
    raw = read_records(result.batch_dir / "raw")
    lines = [
        json.dumps({"id": f"batch-{result.batch_id}/{doc_id}", "text": text}, ensure_ascii=False)
        for doc_id, text in zip(raw.column("id").to_pylist(), raw.column("text").to_pylist(), strict=True)
        if text is not None
    ]
    rel = Path(params.monitor.batches_dir) / f"{result.batch_id}.jsonl"
    atomic_write_bytes(root / rel, ("\n".join(lines) + "\n").encode())
    current = [params.ingest.source] if isinstance(params.ingest.source, str) else list(params.ingest.source)
    sources = current + ([str(rel)] if str(rel) not in current else [])
    return root / rel, [f"ingest.source={json.dumps(sources)}"]
