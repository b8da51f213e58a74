"""Every fingerprint llmops computes, in one place: of files, directories, dvc.lock outputs, JSON-able run keys.

What each is the key of: `file_md5` is `md5sum` (llmops.params_md5); `directory_digest` with md5 is a model's
identity in the registry (llmops.model_md5) and with sha256 a tokenizer's (data/tokens/meta.json), so a token cache
is never reused with another tokenizer; `files_digest` covers a chosen list (the eval data of llmops.eval_data);
`json_key` names a resumable training run or a cached score; `dvc_lock_outputs` reads the data versions DVC recorded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

CHUNK = 1 << 20


def _update_with_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


def file_md5(path: Path) -> str:
    """What `md5sum FILE` prints."""
    h = hashlib.md5()
    _update_with_file(h, Path(path))
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    _update_with_file(h, Path(path))
    return h.hexdigest()


def files_digest(
    paths: Iterable[Path], *, algorithm: str = "md5", extra: str = "", name: Callable[[Path], str] = lambda p: p.name
) -> str:
    """Hex digest over each path's name and bytes in the order given (a missing file counts as `<absent>`), then `extra`."""
    h = hashlib.new(algorithm)
    for path in paths:
        h.update(name(path).encode())
        if path.is_file():
            _update_with_file(h, path)
        else:
            h.update(b"<absent>")
    h.update(extra.encode())
    return h.hexdigest()


def directory_files(directory: Path, *, recursive: bool = False) -> list[Path]:
    """The regular files of `directory` (and its subdirectories when `recursive`), sorted."""
    directory = Path(directory)
    found = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(p for p in found if p.is_file())


def directory_digest(directory: Path, *, algorithm: str = "md5", recursive: bool = False, extra: str = "") -> str:
    """Digest of a directory's files, read now (names relative to it, bytes), e.g. a model or tokenizer directory."""
    directory = Path(directory)
    files = directory_files(directory, recursive=recursive)
    return files_digest(files, algorithm=algorithm, extra=extra, name=lambda p: p.relative_to(directory).as_posix())


def json_key(value: Any, length: int = 16) -> str:
    """A short sha256 of `value` as canonical JSON: equal values give equal keys on every machine."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def dvc_lock_outputs(lock_file: Path) -> dict[str, str]:
    """Every output path in dvc.lock -> its md5 (the data version DVC recorded for it); {} without a dvc.lock."""
    lock_file = Path(lock_file)
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    return {out["path"]: out["md5"] for stage in (lock.get("stages") or {}).values() for out in stage.get("outs") or [] if out.get("md5")}


def weights_identity(model: str) -> str:
    """Size and mtime of a model directory's safetensors (cheap, for a checkpoint key); a hub id stands for itself."""
    path = Path(model)
    if not path.is_dir():
        return model
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.glob("*.safetensors")))


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 over a sequence of texts, each hashed on its own (so a text boundary cannot move unnoticed)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()
