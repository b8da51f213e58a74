"""Our progress bars on stderr for long loops, off with LLMOPS_PROGRESS=0. The libraries' own bars are off unless
LLMOPS_LIBRARY_PROGRESS=1 (their environment switches: llmops.common.env.QUIET_LIBRARIES)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

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


def _from_llmops() -> bool:
    """Whether the tqdm being made was asked for by llmops code (our bars) rather than by a library."""
    frame = sys._getframe(2)  # the caller of `silent`
    while frame is not None and frame.f_globals.get("__name__", "").startswith("tqdm"):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith(("llmops.", "tasks."))


@contextmanager
def library_bars_off() -> Iterator[None]:
    """For the length of the block, every tqdm bar a library makes is off (ours stay) unless LLMOPS_LIBRARY_PROGRESS=1.

    For libraries with no switch of their own (llm-compressor, compressed-tensors, lm-eval): they pass disable= to
    tqdm themselves, so it is forced rather than defaulted."""
    from tqdm import tqdm

    if env.library_progress_enabled():
        yield
        return
    init = tqdm.__init__

    def silent(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **(kwargs if _from_llmops() else {**kwargs, "disable": True}))

    tqdm.__init__ = silent
    try:
        yield
    finally:
        tqdm.__init__ = init
