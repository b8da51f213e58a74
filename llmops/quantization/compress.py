"""One llm-compressor `oneshot` run on a fresh copy of a model, calibrated on seeded blocks of the train split, saved as
compressed-tensors (the format vLLM loads) with its tokenizer."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmops.common.errors import DataError
from llmops.params.quantize import QuantizeConfig

log = logging.getLogger("llmops.quantize")


def calibration_dataset(tokens: Path, cfg: QuantizeConfig) -> Any:
    """`calibration_samples` blocks of `calibration_seq_len` tokens drawn (seeded) from the train split, as the
    pre-tokenized `datasets.Dataset` llm-compressor's oneshot takes."""
    from datasets import Dataset

    from llmops.data.token_shards import TokenShards
    from llmops.training.data import TokenBlocks

    train = TokenShards(tokens, "train")
    if len(train) < cfg.calibration_seq_len:
        raise DataError(
            f"{train}: {len(train)} tokens is less than one calibration block of "
            f"quantize.calibration_seq_len={cfg.calibration_seq_len}; lower it or add data."
        )
    blocks = TokenBlocks(train, cfg.calibration_seq_len, seed=cfg.seed)
    count = min(cfg.calibration_samples, len(blocks))
    if count < cfg.calibration_samples:
        log.warning("quantize: the train split holds %d blocks of %d tokens; calibrating on those, not the %d asked for",
                    count, cfg.calibration_seq_len, cfg.calibration_samples)
    ids = [blocks[i]["input_ids"].tolist() for i in range(count)]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def latency_prompt(tokens: Path, cfg: QuantizeConfig) -> list[int]:
    """The fixed prompt every model is timed on: the first tokens of the held-out split."""
    from llmops.data.token_shards import TokenShards

    return TokenShards(tokens, "val")[: cfg.latency_prompt_tokens].tolist()


@contextmanager
def unpinned_cache_without_accelerator() -> Iterator[None]:
    """Leave llm-compressor's cached calibration inputs unpinned on a host without an accelerator.

    AWQModifier pins its cached layer inputs before each grid search (llm-compressor 0.14, vllm-project/llm-compressor
    PR 2813) and torch refuses to pin memory when no accelerator exists; pinning only speeds copies to a device, so
    on such a host the cache stays as it is.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    pin = IntermediatesCache.__dict__["_pin_intermediate"]
    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    try:
        yield
    finally:
        IntermediatesCache._pin_intermediate = pin


def quantize(model_dir: Path, modifiers: list[Any], calibration: Any, cfg: QuantizeConfig, dest: Path) -> float:
    """One oneshot run on a fresh copy of the model, saved compressed with its tokenizer; returns seconds taken."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with unpinned_cache_without_accelerator():
        oneshot(
            model=model, processor=tokenizer, recipe=modifiers, dataset=calibration, num_calibration_samples=len(calibration),
            max_seq_length=cfg.calibration_seq_len, batch_size=cfg.calibration_batch_size, shuffle_calibration_samples=False,
        )
    model.save_pretrained(str(dest), save_compressed=True)
    tokenizer.save_pretrained(str(dest))
    return time.perf_counter() - started
