"""Which trainer distills: the project's `Trainer.compute_loss` subclass (llmops/training/distill.py, packed pairs) or
TRL's GKDTrainer (trl.experimental.gkd; lmbda=0, beta=0: off-policy forward KL on the given completions, the same
objective), on the same teacher, pairs, student initialisation, optimiser and steps, one after the other in one run.

Reported per trainer: wall time, seconds per optimizer step, and the held-out KL(teacher || student) at temperature 1
after training (llmops.training.distill.held_out_kl on the fine-tune eval split: the number the distill stage reports).
TRL's main DistillationTrainer is not in the comparison: it generates its completions on-policy from the student
(`max_completion_length` tokens per prompt per step), a different and, on CPU, far slower recipe.

    .venv/bin/python benchmarks/bench_distill.py --project DIR [--steps 30] [--batch-size 8] [--threads 0]

DIR is a checkout after `make run` (or the finetune stage): models/finetune and data/instructions/. Prints a markdown
table and writes benchmarks/results/distill.json (gitignored).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _setup import RESULTS  # noqa: E402  (repo on sys.path, offline environment, no progress bars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import set_seed

    from llmops.evaluation.generation import load_model
    from llmops.params.distill import DistillConfig
    from llmops.params.train import TrainConfig
    from llmops.training import runtime
    from llmops.training.data import PairDataset, pair_collator
    from llmops.training.distill import fit, held_out_kl, init_student
    from llmops.training.instructions import cap_pairs
    from tasks.distill import encode, read_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DistillConfig(batch_size=args.batch_size, max_steps=args.steps, lr=0.002, warmup_steps=5)
    teacher, tokenizer = load_model(args.project / "models/finetune")
    train_pairs = cap_pairs(read_pairs(args.project / "data/instructions/train.jsonl"), args.steps * args.batch_size)
    eval_pairs = cap_pairs(read_pairs(args.project / "data/instructions/eval.jsonl"), cfg.max_eval_pairs)
    tokenizer.backend_tokenizer.encode_special_tokens = True  # as the distill stage encodes them
    kept = [(pair, encode(tokenizer, [pair], cfg.max_seq_len, [])) for pair in train_pairs]
    train_messages = [pair.messages for pair, example in kept if example]  # the same pairs for both trainers
    train_examples = [example[0] for _, example in kept if example]
    eval_examples = encode(tokenizer, eval_pairs, cfg.max_seq_len, [])
    tokenizer.backend_tokenizer.encode_special_tokens = False
    rows = []

    def student() -> object:
        set_seed(0)
        return init_student(teacher, cfg.num_layers, cfg.init)

    with tempfile.TemporaryDirectory() as tmp:
        model = student()
        kl_before = held_out_kl(model, teacher, eval_examples)
        started = time.perf_counter()
        trainer, result = fit(
            train=TrainConfig(device="cpu", save_every=10**9, eval_every=0), optim=runtime.Optim.of(cfg, max_steps=args.steps),
            student=model, teacher=teacher, tokenizer=tokenizer, train_dataset=PairDataset(train_examples, seed=0), eval_dataset=None,
            collator=pair_collator(tokenizer, packing=True), run_dir=Path(tmp) / "ours", temperature=cfg.temperature, ce_weight=cfg.ce_weight,
        )
        seconds = time.perf_counter() - started
        rows.append({"trainer": f"Trainer.compute_loss subclass (packed, T={cfg.temperature})", "seconds": seconds, "steps": result.steps,
                     "tokens": result.tokens, "kl_after": held_out_kl(trainer.model, teacher, eval_examples)})

        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        model = student()
        gkd_args = GKDConfig(
            output_dir=str(Path(tmp) / "gkd"), max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=cfg.lr,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio}, warmup_steps=cfg.warmup_steps,
            adam_beta2=0.95, max_grad_norm=cfg.max_grad_norm, lmbda=0.0, beta=0.0, max_length=cfg.max_seq_len, use_cpu=True, bf16=False,
            report_to="none", save_strategy="no", logging_steps=10, gradient_checkpointing=False, disable_tqdm=True, seed=0,
        )
        gkd = GKDTrainer(model=model, teacher_model=teacher, args=gkd_args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": m} for m in train_messages]))
        started = time.perf_counter()
        gkd.train()
        seconds = time.perf_counter() - started
        rows.append({"trainer": "TRL GKDTrainer (lmbda=0, beta=0, padded ChatML batches, T=1)", "seconds": seconds,
                     "steps": gkd.state.global_step, "tokens": None, "kl_after": held_out_kl(gkd.model, teacher, eval_examples)})

    print(f"\nteacher {args.project / 'models/finetune'} ({teacher.config.num_hidden_layers} layers) -> {cfg.num_layers}-layer student "
          f"({cfg.init}); {len(train_examples)} train pairs, batch {args.batch_size}, {args.steps} steps; held-out KL before "
          f"{kl_before:.4f} on {len(eval_examples)} eval pairs; {torch.get_num_threads()} threads\n")
    print("| trainer | wall s | s/step | held-out KL after |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['trainer']} | {r['seconds']:.1f} | {r['seconds'] / max(r['steps'], 1):.2f} | {r['kl_after']:.4f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "distill.json"
    out.write_text(json.dumps({"kl_before": kl_before, "rows": rows}, indent=2) + "\n")
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
