"""What needs the model: held-out perplexity over token blocks, and batched completions with `generate`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.common.errors import DataError
from llmops.common.progress import progress
from llmops.evaluation.scoring import STOP_SEQUENCES, truncate_at_stop


log = logging.getLogger("llmops.evaluate")


@dataclass
class Perplexity:
    perplexity: float
    loss: float  # mean cross-entropy, nats per predicted token
    tokens: int  # predicted tokens scored


def load_model(path: Path | str) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from an HF directory, in eval mode, fp32 (CPU-friendly, exact)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
    except (OSError, ValueError) as exc:
        raise DataError(f"evaluate: cannot load the model in {path} ({exc}); run the finetune stage first.") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def perplexity(model: Any, blocks: Any, *, batch_size: int, desc: str) -> Perplexity:
    """exp(mean next-token loss) over every block of `blocks` (a TokenBlocks); every block has the same length."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    total_loss, total_tokens = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    with torch.inference_mode():
        for start in progress(starts, desc=desc, unit="batch", total=len(starts)):
            ids = torch.stack([blocks[i]["input_ids"] for i in range(start, min(start + batch_size, len(blocks)))])
            if int(ids.max()) >= vocab:
                raise DataError(
                    f"evaluate: token id {int(ids.max())} is outside the model's vocabulary ({vocab}): the held-out split was "
                    "made with another tokenizer. Re-run tokenize (`dvc repro`)."
                )
            loss = model(input_ids=ids, labels=ids).loss  # mean over the batch's predicted tokens
            predicted = ids.shape[0] * (ids.shape[1] - 1)
            total_loss += float(loss) * predicted
            total_tokens += predicted
    mean = total_loss / total_tokens
    return Perplexity(perplexity=math.exp(mean) if mean < 50 else float("inf"), loss=mean, tokens=total_tokens)


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The turns before the answer as the fine-tuned model saw prompts in training (its chat template; the `code`
    template concatenates them as they are); without a template, the contents concatenated."""
    if not getattr(tokenizer, "chat_template", None):
        return "".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_budget(context: int, max_new_tokens: int) -> int:
    """Prompt tokens kept (the end of the prompt: the signature being completed): prompt + answer fit the model's
    context where they can, and at least half the context goes to the prompt."""
    return max(context - max_new_tokens, context // 2, 1)


def complete(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    desc: str,
) -> list[list[str]]:
    """`samples` completions per prompt (its messages before the answer), each cut at EOS or the first stop
    sequence: greedy when samples == 1.

    Prompts are left-padded and grouped by length (less padding); generation of a row ends at EOS or a stop
    string, the batch when every row has ended.
    """
    import torch
    from transformers import set_seed

    set_seed(seed)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    budget = prompt_budget(context, max_new_tokens)
    if budget + max_new_tokens > context:
        log.warning("%s: prompt (up to %d tokens) + max_new_tokens (%d) exceed the model's context of %d tokens; "
                    "generation runs past the length it was trained on", desc, budget, max_new_tokens, context)
    rows = [(i, render_prompt(tokenizer, p)) for i, p in enumerate(prompts) for _ in range(samples)]
    backend = tokenizer.backend_tokenizer
    encoded = [(i, backend.encode(text, add_special_tokens=False).ids[-budget:]) for i, text in rows]
    order = sorted(range(len(encoded)), key=lambda j: len(encoded[j][1]))
    out: list[list[str]] = [[] for _ in prompts]
    pad = tokenizer.pad_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if samples > 1 else {"do_sample": False}
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for batch in progress(batches, desc=desc, unit="batch"):
            width = max(len(encoded[j][1]) for j in batch)
            ids = torch.tensor([[pad] * (width - len(encoded[j][1])) + encoded[j][1] for j in batch])
            mask = torch.tensor([[0] * (width - len(encoded[j][1])) + [1] * len(encoded[j][1]) for j in batch])
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
                stop_strings=list(STOP_SEQUENCES),
                tokenizer=tokenizer,
                **sampling,
            )
            for row, j in enumerate(batch):
                new = generated[row, width:].tolist()
                if tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(new, skip_special_tokens=True)
                out[encoded[j][0]].append(truncate_at_stop(text))
    return out
