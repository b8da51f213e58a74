"""Our progress bars on stderr for long loops, off with LLMOPS_PROGRESS=0. The libraries' own bars are off unless
LLMOPS_LIBRARY_PROGRESS=1 (their environment switches: llmops.common.env.QUIET_LIBRARIES)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from llmops.common import env

T = TypeVar("T")


def progress(items: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """A tqdm bar on stderr; LLMOPS_PROGRESS=0 turns bars off (tests, log files)."""
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit=unit, total=total, disable=not env.progress_enabled(), file=sys.stderr, dynamic_ncols=True))


def quiet_libraries() -> None:
    """Silence transformers' and huggingface_hub's bars (loading, saving weights) unless LLMOPS_LIBRARY_PROGRESS=1: the
    environment switch covers processes the CLI started; this covers a stage called from Python."""
    if not env.library_progress_enabled():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
