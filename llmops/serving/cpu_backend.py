"""The CPU backend: `transformers serve`'s own app (model preloaded, continuous batching) under uvicorn on a Unix socket, never a TCP port.

`transformers serve` has no --uds flag. Its `Serve` command builds the FastAPI app and hands it to
`uvicorn.Config(app, host=..., port=...)`; this launcher runs that same command with `uvicorn.Config`
replaced, for the length of the call, by one that serves a socket bound here (mode 0600). What it relies
on is Serve's command-line options (its keyword arguments) and uvicorn's public Config, not the
handler classes behind them. Serve is given port -1, which cannot be bound: should a transformers
release stop calling `uvicorn.Config` through the module, the backend fails at startup rather than
listening on TCP (tests/serving pin both the socket and the absence of any TCP listener).

With `--draft DIR` (serve.speculative) every request is generated with transformers assisted generation, the draft
proposing `--num-speculative-tokens` tokens per round. Assisted generation takes one sequence at a time
(`_assisted_decoding` raises for a batch above 1) and continuous batching has no draft support, so with a draft the
backend runs transformers serve's sequential path: requests are served one after another on one inference thread, and
each gets the draft through the `model.generate` keyword arguments (SpeculativeGenerateManager).

Run: python -m llmops.serving.cpu_backend --uds PATH MODEL_DIR [--device cpu] [--cb-num-blocks N] [--cb-block-size N]
     [--cb-max-batch-tokens N] [--torch-threads N] [--draft DIR --num-speculative-tokens N]
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

UNBINDABLE_PORT = -1


def bind_private_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, created mode 0600 (a stale socket file from a dead backend is replaced)."""
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(previous)
    sock.listen(2048)
    return sock


@contextmanager
def uvicorn_on_socket(sock: socket.socket, log_level: str) -> Iterator[None]:
    """While active, every `uvicorn.Config(app, ...)` serves `sock` (by fd) whatever host and port it is given."""
    import uvicorn

    original = uvicorn.Config

    class SocketConfig(original):  # type: ignore[misc, valid-type]
        def __init__(self, app, **kwargs):  # noqa: ANN001
            for key in ("host", "port", "uds", "fd", "log_level"):
                kwargs.pop(key, None)
            super().__init__(app, fd=sock.fileno(), log_level=log_level, access_log=False, **kwargs)

    uvicorn.Config = SocketConfig
    try:
        yield
    finally:
        uvicorn.Config = original


@contextmanager
def assisted_generation(draft: Any) -> Iterator[None]:
    """While active, transformers serve's sequential generate manager passes `assistant_model=draft` to every
    `model.generate` call (streaming and not); `GenerationState` creates its managers from the module's
    GenerateManager, which is replaced for the length of the call."""
    from transformers.cli.serving import utils

    original = utils.GenerateManager

    class SpeculativeGenerateManager(original):  # type: ignore[misc, valid-type]
        def generate_streaming(self, model, processor, inputs, *args, **kwargs):  # noqa: ANN001, ANN202
            return super().generate_streaming(model, processor, {**inputs, "assistant_model": draft}, *args, **kwargs)

        async def generate_non_streaming(self, model, processor, inputs, *args, **kwargs):  # noqa: ANN001, ANN202
            return await super().generate_non_streaming(model, processor, {**inputs, "assistant_model": draft}, *args, **kwargs)

    utils.GenerateManager = SpeculativeGenerateManager
    try:
        yield
    finally:
        utils.GenerateManager = original


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="transformers serve (continuous batching) on a Unix socket.")
    parser.add_argument("model", help="local HF model directory, preloaded")
    parser.add_argument("--uds", type=Path, required=True, help="socket path; its directory should be private (0700)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cb-num-blocks", type=int, default=0, help="KV-cache blocks; 0 = sized from free memory")
    parser.add_argument("--cb-block-size", type=int, default=0, help="tokens per KV-cache block; 0 = library default")
    parser.add_argument("--cb-max-batch-tokens", type=int, default=0, help="0 = library default")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--draft", type=Path, default=None, help="draft model directory: assisted generation, one request at a time")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="tokens the draft proposes per round")
    args = parser.parse_args(argv)

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    from transformers.cli.serve import Serve

    speculative = nullcontext()
    if args.draft is not None:
        import torch

        from llmops.serving.speculative import load_draft

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")  # beside the served model
        speculative = assisted_generation(load_draft(args.draft, args.num_speculative_tokens, device=device))
    sock = bind_private_socket(args.uds)
    with uvicorn_on_socket(sock, args.log_level), speculative:
        Serve(
            force_model=args.model,
            continuous_batching=args.draft is None,
            device=args.device,
            trust_remote_code=False,
            cb_num_blocks=args.cb_num_blocks or None,
            cb_block_size=args.cb_block_size or None,
            cb_max_batch_tokens=args.cb_max_batch_tokens or None,
            host="127.0.0.1",
            port=UNBINDABLE_PORT,
            log_level=args.log_level,
        )


if __name__ == "__main__":
    main()
