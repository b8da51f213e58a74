"""align: preference optimisation of the fine-tuned model with TRL, DPO on preference pairs (offline) or GRPO on a
doctest reward (online), LoRA or full; then the held-out doctest pass rate and perplexity of both models decide which
one is the candidate.

DPO pairs come from `align.data` (JSONL of prompt/chosen/rejected; bad rows quarantined with file:line) or, by
default, from the corpus by execution feedback: for each docstring -> body prompt whose docstring carries doctest
examples and whose reference body passes them in the sandbox, the reference body is chosen and a sample of the
fine-tuned model that fails them is rejected. GRPO samples bodies online and rewards each with the share of the
prompt's doctest examples it passes. Prompts of source files in finetune's held-out split (finetune.eval_fraction)
are never trained on here either: they are the held-out doctest prompts both models are scored on. HumanEval prompts
are kept out of everything trained on.

Writes models/aligned/ (a standalone HF model, LoRA merged) and reports/align/ (pairs.jsonl, quarantine.jsonl,
heldout.jsonl, curves.tsv, loss_curve.png); the runner writes metrics/align.json, whose `candidate` (aligned |
finetuned) names the model downstream stages take (llmops.training.align.candidate_model_dir).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from llmops.common.errors import ConfigError, DataError
from llmops.common.fingerprints import weights_identity
from llmops.common.io import atomic_dir, atomic_write_json, check_replaceable
from llmops.common.progress import quiet_libraries
from llmops.common.results import StageResult
from llmops.evaluation.doctests import (
    checked_prompts,
    doctest_scores,
    mine_doctest_prompts,
)
from llmops.params.align import AlignConfig
from llmops.params.evaluate import EvaluateConfig
from llmops.params.finetune import FinetuneConfig
from llmops.params.paths import PathsConfig
from llmops.params.train import TrainConfig
from llmops.training import align, runtime
from llmops.training.instructions import Rejected, in_eval_split
from llmops.training.preferences import (
    DoctestPrompt,
    PreferencePair,
    humaneval_prompts,
    is_humaneval_prompt,
    read_preference_jsonl,
)


def run(cfg: AlignConfig, train: TrainConfig, finetune: FinetuneConfig, evaluate: EvaluateConfig, paths: PathsConfig) -> StageResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from llmops.evaluation.suite import held_out_perplexity, sandbox_mode

    quiet_libraries()
    out, report = paths.aligned_model, paths.reports / "align"
    for written_after_training in (out, report):
        check_replaceable(written_after_training)  # refuse a foreign folder now, not after the training it would waste
    if cfg.method == "grpo" and cfg.data:
        raise ConfigError("params.yaml: align.data is DPO's pairs; align.method=grpo samples its own bodies from the corpus's doctest prompts (set align.data: \"\")")
    if cfg.method == "grpo" and cfg.samples_per_prompt < 2:
        raise ConfigError(f"params.yaml: align.samples_per_prompt={cfg.samples_per_prompt}: GRPO compares a prompt's samples with each other and needs at least 2")
    finetuned = paths.finetune_model
    if not (finetuned / "config.json").exists():
        raise DataError(f"{finetuned}: no fine-tuned model (config.json missing); run the finetune stage first.")
    isolated = sandbox_mode(evaluate)  # before any work: every path below executes generated code
    tokenizer = AutoTokenizer.from_pretrained(finetuned)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    humaneval = humaneval_prompts()
    counts: Counter[str] = Counter()
    quarantined: list[Rejected] = []
    train_prompts, heldout_prompts = _doctest_prompts(cfg, finetune, train.seed, paths.dedup, humaneval, evaluate, isolated, counts)
    set_seed(train.seed)
    model = AutoModelForCausalLM.from_pretrained(finetuned, dtype="float32")
    model.eval()
    finetuned_scores, heldout_rows = _score_heldout(model, tokenizer, heldout_prompts, cfg, evaluate, isolated, train.seed, "finetuned")
    finetuned_scores["perplexity"] = held_out_perplexity(finetuned, paths.tokens, evaluate, "align: perplexity (fine-tuned)")["perplexity"]

    pairs: list[PreferencePair] = []
    if cfg.method == "dpo":
        if cfg.data:
            pairs = _user_pairs(cfg, paths.root, humaneval, quarantined, counts)
        elif train_prompts:
            pairs = _execution_pairs(model, tokenizer, train_prompts, cfg, evaluate, isolated, train.seed, counts)
        pairs = _within_length(tokenizer, pairs, cfg.max_seq_len, quarantined)
        if cfg.data and not pairs:
            raise DataError(f"align: no preference pairs left in {cfg.data} ({len(quarantined)} quarantined); see {paths.relative(report)}/quarantine.jsonl")
        units = len(pairs)
    else:
        units = len(train_prompts) * cfg.samples_per_prompt  # GRPO: completions, batch_size of them per step

    fit: dict[str, Any] = {"steps": 0, "train_seconds": 0.0, "resumed_from_step": 0, "log_history": []}
    aligned_scores: dict[str, Any] = {}
    trainable = total = 0
    if units:
        trainer, run_dir, max_steps = _trainer(cfg, train, units, paths, model, tokenizer, pairs, train_prompts, evaluate, isolated)
        total = sum(p.numel() for p in trainer.model.parameters())
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        fit = align.fit(trainer, run_dir, max_steps)
        align.save_aligned(trainer, tokenizer, out, {"method": cfg.method, "tuning": cfg.tuning, "base": paths.relative(finetuned)})
        del trainer, model
        aligned_model, _ = _load(out)
        aligned_scores, aligned_rows = _score_heldout(aligned_model, tokenizer, heldout_prompts, cfg, evaluate, isolated, train.seed, "aligned")
        aligned_scores["perplexity"] = held_out_perplexity(out, paths.tokens, evaluate, "align: perplexity (aligned)")["perplexity"]
        heldout_rows += aligned_rows
        candidate, reason = align.choose_candidate(cfg.replace_if, finetuned_scores, aligned_scores, cfg.max_perplexity_increase)
        runtime.cleanup_checkpoints(run_dir)
    else:  # a corpus without usable doctest prompts: nothing to align, and the stage says so instead of failing the run
        candidate, reason = "finetuned", (
            f"nothing was trained: no {'preference pairs' if cfg.method == 'dpo' else 'training doctest prompts'} "
            f"(doctest prompts whose reference passes its doctests: {len(train_prompts)} for training; counts {dict(counts)})"
        )
        with atomic_dir(out) as tmp:
            atomic_write_json(tmp / "none.json", {"note": f"align: {reason}; the candidate is the fine-tuned model"})
    history = fit["log_history"]

    with atomic_dir(report) as tmp:
        _write_jsonl(tmp / "pairs.jsonl", [p.to_json() for p in pairs])
        _write_jsonl(tmp / "quarantine.jsonl", [r.to_json() for r in quarantined])
        _write_jsonl(tmp / "heldout.jsonl", heldout_rows)
        (tmp / "curves.tsv").write_text(align.trl_curves(history), encoding="utf-8")
        if history:
            runtime.plot_loss_curve(history, tmp / "loss_curve.png", f"align ({cfg.method}, {cfg.tuning})")

    trl = {key: value for key in align.PREFERENCE_LOG_KEYS if (value := align.last_logged(history, key)) is not None}
    metrics: dict[str, Any] = {
        "method": cfg.method,
        "tuning": cfg.tuning,
        "pairs": {"built": len(pairs), "quarantined": len(quarantined), **dict(sorted(counts.items()))},
        "prompts": {"train": len(train_prompts), "heldout": len(heldout_prompts)},
        "trainable_parameters": trainable,
        "parameters": total,
        "steps": fit["steps"],
        "train_seconds": fit["train_seconds"],
        "resumed_from_step": fit["resumed_from_step"],
        "train_loss": align.last_logged(history, "loss"),
        "trl": trl,
        "trl_first_step": {key: value for key in align.PREFERENCE_LOG_KEYS if (value := align.first_logged(history, key)) is not None},
        "heldout": {"finetuned": finetuned_scores, "aligned": aligned_scores},
        "candidate": candidate,
        "candidate_rule": cfg.replace_if,
        "candidate_reason": reason,
    }
    if "rewards/margins" in trl:
        detail = f"reward margin {trl['rewards/margins']:+.3f}, accuracy {trl.get('rewards/accuracies', float('nan')):.2f}"
    else:
        detail = f"reward {trl.get('reward', float('nan')):.3f}"
    rate = "n/a" if finetuned_scores["doctest_pass_rate"] is None else f"{finetuned_scores['doctest_pass_rate']:.3f}"
    if aligned_scores:
        aligned_rate = "n/a" if aligned_scores["doctest_pass_rate"] is None else f"{aligned_scores['doctest_pass_rate']:.3f}"
        outcome = (
            f"{fit['steps']} steps, {detail}; held-out doctest pass rate {rate} -> {aligned_rate} on {len(heldout_prompts)} prompts, "
            f"perplexity {finetuned_scores['perplexity']:.1f} -> {aligned_scores['perplexity']:.1f}"
        )
    else:
        outcome = "nothing trained"
    summary = (
        f"align ({cfg.method}, {cfg.tuning}): {len(pairs) if cfg.method == 'dpo' else len(train_prompts)} "
        f"{'pairs' if cfg.method == 'dpo' else 'prompts'}, {len(quarantined)} quarantined; {outcome}; candidate: {candidate} -> {out}"
    )
    return StageResult(metrics=metrics, summary=summary, artifacts=[report, out])


def _load(model_dir: Path) -> tuple[Any, Any]:
    from llmops.evaluation.generation import load_model

    return load_model(model_dir)


def _doctest_prompts(
    cfg: AlignConfig, finetune: FinetuneConfig, seed: int, dedup: Path, humaneval: list[str], evaluate: EvaluateConfig,
    isolated: bool, counts: Counter[str],
) -> tuple[list[DoctestPrompt], list[DoctestPrompt]]:
    """(train, held-out) doctest prompts of the corpus whose reference body passes its doctests in the sandbox, with
    the examples an empty body also passes dropped from the checks; held out are those of finetune's held-out source
    files. Each side is capped (by id hash) before the references run."""
    found = mine_doctest_prompts(dedup, cfg.max_examples, humaneval, counts, keep_source=lambda _: True, desc="align: mining doctest prompts")
    counts["doctest_prompts"] = len(found)
    heldout = [p for p in found if in_eval_split(p.source, finetune.eval_fraction, seed)]
    train = [p for p in found if not in_eval_split(p.source, finetune.eval_fraction, seed)]
    train, heldout = checked_prompts([train, heldout], [cfg.max_prompts, cfg.max_eval_prompts], evaluate, isolated=isolated, counts=counts)
    return train, heldout


def _user_pairs(cfg: AlignConfig, root: Path, humaneval: list[str], quarantined: list[Rejected], counts: Counter[str]) -> list[PreferencePair]:
    path = Path(root) / cfg.data
    if not path.is_file():
        raise ConfigError(f"params.yaml: align.data={cfg.data!r} is not a file (expected JSONL of prompt/chosen/rejected)")
    pairs, bad = read_preference_jsonl(path, shown=cfg.data)  # quarantine rows name the file as params.yaml does
    quarantined.extend(bad)
    counts["rows"] = len(pairs) + len(bad)
    kept = []
    for pair in pairs:
        if is_humaneval_prompt(pair.prompt, humaneval):
            quarantined.append(Rejected(pair.id, "the prompt is a HumanEval problem's (evaluation data is never trained on)", pair.to_json()))
            continue
        kept.append(pair)
    return kept


def _execution_pairs(
    model: Any, tokenizer: Any, prompts: list[DoctestPrompt], cfg: AlignConfig, evaluate: EvaluateConfig, isolated: bool,
    seed: int, counts: Counter[str],
) -> list[PreferencePair]:
    """`samples_per_prompt` samples of the fine-tuned model per prompt, made into pairs by align.execution_pairs."""
    from llmops.evaluation.generation import complete

    samples = complete(
        model, tokenizer, [[{"role": "user", "content": p.prompt}] for p in prompts], samples=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size, seed=seed,
        desc="align: sampling bodies of the fine-tuned model",
    )
    return align.execution_pairs(prompts, samples, evaluate, isolated=isolated, counts=counts)


def _rendered(tokenizer: Any, prompt: str) -> str:
    """The prompt as the fine-tuned model sees it (its chat template: the `code` template leaves it as it is)."""
    from llmops.evaluation.generation import render_prompt

    return render_prompt(tokenizer, [{"role": "user", "content": prompt}])


def _within_length(tokenizer: Any, pairs: list[PreferencePair], max_seq_len: int, quarantined: list[Rejected]) -> list[PreferencePair]:
    kept = []
    for pair in pairs:
        prompt = len(tokenizer(_rendered(tokenizer, pair.prompt))["input_ids"])
        longest = prompt + max(len(tokenizer(pair.chosen)["input_ids"]), len(tokenizer(pair.rejected)["input_ids"])) + 1
        if longest > max_seq_len:
            quarantined.append(Rejected(pair.id, f"too long: {longest} tokens > align.max_seq_len={max_seq_len}", pair.to_json()))
            continue
        kept.append(pair)
    return kept


def _trainer(
    cfg: AlignConfig, train: TrainConfig, units: int, paths: PathsConfig, model: Any, tokenizer: Any,
    pairs: list[PreferencePair], prompts: list[DoctestPrompt], evaluate: EvaluateConfig, isolated: bool,
) -> tuple[Any, Path, int]:
    """(TRL trainer, checkpoint directory, optimizer steps): `units` are DPO pairs or GRPO completions, batch_size of
    them per step per process."""
    from datasets import Dataset

    steps_per_epoch = math.ceil(units / (cfg.batch_size * cfg.grad_accum * runtime.world_size()))
    max_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps:
        max_steps = min(max_steps, cfg.max_steps)
    optim = runtime.Optim.of(cfg, max_steps=max_steps)
    trained_on = [p.id for p in pairs] if cfg.method == "dpo" else [p.id for p in prompts]
    run_dir = runtime.checkpoint_dir(
        paths.checkpoints, "align", cfg, train, base_weights=weights_identity(str(paths.finetune_model)),
        data=trained_on[:50] + [len(trained_on)],
    )
    model.train()
    peft = align.peft_config(cfg.tuning, cfg.lora)
    try:
        if cfg.method == "dpo":
            from trl import DPOConfig, DPOTrainer

            args = align.trl_config(DPOConfig, train, optim, run_dir, beta=cfg.beta, max_length=cfg.max_seq_len)
            rows = [{"prompt": _rendered(tokenizer, p.prompt), "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
            trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=peft)
        else:
            from trl import GRPOConfig, GRPOTrainer

            args = align.trl_config(
                GRPOConfig, train, optim, run_dir, beta=cfg.beta, num_generations=cfg.samples_per_prompt,
                max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            )
            rows = [{"prompt": _rendered(tokenizer, p.prompt), "doctest_id": p.id} for p in prompts]
            reward = align.doctest_reward({p.id: p for p in prompts}, evaluate, isolated=isolated)
            trainer = GRPOTrainer(
                model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=peft,
            )
    except ValueError as exc:  # TRL's checks of its config (e.g. a batch not divisible by the generations per prompt)
        raise ConfigError(f"params.yaml: align ({cfg.method}): {exc}") from None
    align.attach_callbacks(trainer, f"align: {cfg.method}")
    return trainer, run_dir, max_steps


def _score_heldout(
    model: Any, tokenizer: Any, prompts: list[DoctestPrompt], cfg: AlignConfig, evaluate: EvaluateConfig, isolated: bool,
    seed: int, name: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The model's held-out doctest scores (llmops.evaluation.doctests.doctest_scores), its rows marked with `name`."""
    scores, rows = doctest_scores(
        model, tokenizer, prompts, evaluate, max_new_tokens=cfg.max_new_tokens, seed=seed, isolated=isolated, desc=f"align: held-out bodies ({name})"
    )
    return scores, [{"model": name, **row} for row in rows]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
