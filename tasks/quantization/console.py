"""Keep the console readable while llm-compressor runs: its per-layer INFO/METRIC lines go to a log file, warnings
still reach the console, and with LLMOPS_PROGRESS=0 its and compressed-tensors' tqdm bars are off too."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partialmethod
from pathlib import Path

CONSOLE_FORMAT = "llm-compressor {level}: {message}"


@contextmanager
def quiet_compressor(log_file: Path) -> Iterator[None]:
    from llmcompressor.logger import LOGGER_CONFIG, configure_logger, logger
    from tqdm import tqdm

    # llm-compressor disables tokenizer threads itself, with a warning, unless the variable is set
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logger.remove()
    sinks = [
        logger.add(sys.stderr, level="WARNING", format=CONSOLE_FORMAT, filter=lambda r: r["level"].name != "METRIC"),
        logger.add(str(log_file), level="INFO", format="{time:HH:mm:ss.SSS} | {function} | {level} - {message}"),
    ]
    init = tqdm.__init__
    if os.environ.get("LLMOPS_PROGRESS", "1") == "0":
        tqdm.__init__ = partialmethod(init, disable=True)  # tqdm's documented way to silence bars made elsewhere
    try:
        with warnings.catch_warnings():
            # save_pretrained warns about "offloaded modules" llm-compressor's own dispatch registers on CPU
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            yield
    finally:
        tqdm.__init__ = init
        for sink in sinks:
            logger.remove(sink)
        configure_logger(LOGGER_CONFIG)
