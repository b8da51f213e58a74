"""Keep the console readable while llm-compressor and compressed-tensors run: llm-compressor's per-layer INFO/METRIC
lines go to a log file and only its unexpected warnings reach the console; their tqdm bars (calibrating, compressing,
decompressing on load) are off unless LLMOPS_LIBRARY_PROGRESS=1, while ours (scoring each variant) stay."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmops.common.progress import library_bars_off

CONSOLE_FORMAT = "llm-compressor {level}: {message}"


EXPECTED = ("No accelerator available",)  # CPU calibration is this stage's default, not news


def _console_worthy(record: dict) -> bool:
    return record["level"].name != "METRIC" and not record["message"].startswith(EXPECTED)


@contextmanager
def quiet_compressor(log_file: Path) -> Iterator[None]:
    level = os.environ.get("LLM_COMPRESSOR_LOG_LEVEL")
    os.environ["LLM_COMPRESSOR_LOG_LEVEL"] = "ERROR"  # its import already warns "No accelerator available" on CPU
    try:
        from llmcompressor.logger import LOGGER_CONFIG, configure_logger, logger
    finally:
        if level is None:
            del os.environ["LLM_COMPRESSOR_LOG_LEVEL"]
        else:
            os.environ["LLM_COMPRESSOR_LOG_LEVEL"] = level

    # llm-compressor disables tokenizer threads itself, with a warning, unless the variable is set
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logger.remove()
    sinks = [
        logger.add(sys.stderr, level="WARNING", format=CONSOLE_FORMAT, filter=_console_worthy),
        logger.add(str(log_file), level="INFO", format="{time:HH:mm:ss.SSS} | {function} | {level} - {message}"),
    ]
    fx_log = logging.getLogger("torch.fx._symbolic_trace")  # warns once that llm-compressor's tracing counts as export
    fx_level = fx_log.level
    fx_log.setLevel(logging.ERROR)
    try:
        with library_bars_off(), warnings.catch_warnings():
            # save_pretrained warns about "offloaded modules" llm-compressor's own dispatch registers on CPU
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            yield
    finally:
        fx_log.setLevel(fx_level)
        for sink in sinks:
            logger.remove(sink)
        configure_logger(LOGGER_CONFIG)
