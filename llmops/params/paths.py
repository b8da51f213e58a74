"""params.yaml `paths`: where each stage reads and writes, relative to the repository root (dvc.yaml templates these).

Loaded with `load_params(root / "params.yaml")`, every path is made absolute against `root`, the folder that holds
params.yaml: code never depends on the working directory. `relative(path)` gives back the form dvc.yaml and
dvc.lock use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import PrivateAttr

from llmops.params.base import Section


class PathsConfig(Section):
    raw: Path = Path("data/raw")
    validated: Path = Path("data/validated")
    quarantine: Path = Path("data/quarantine")
    dedup: Path = Path("data/dedup")
    duplicates: Path = Path("data/duplicates")
    tokens: Path = Path("data/tokens")
    tokenizer: Path = Path("models/tokenizer")
    reports: Path = Path("reports")
    metrics: Path = Path("metrics")
    instructions: Path = Path("data/instructions")  # finetune's pairs: train/eval JSONL and the quarantine
    pretrain_model: Path = Path("models/pretrain")
    finetune_model: Path = Path("models/finetune")  # full weights (LoRA merged): what evaluation and serving load
    adapter: Path = Path("models/adapter")  # the LoRA adapter itself (empty for full fine-tuning)
    checkpoints: Path = Path("checkpoints")  # resumable training state; not a DVC output, never half-taken as done
    quantized: Path = Path("models/quantized")  # one compressed-tensors HF directory per scheme (w8a8/, w4a16/)
    registry: Path = Path("models/registry")  # registry downloads: <name>/<version>/ (a plain HF directory)

    _root: Path | None = PrivateAttr(default=None)

    def under(self, root: Path) -> PathsConfig:
        """These paths made absolute against the repository root `root`; absolute ones stay as they are."""
        root = Path(root).resolve()
        resolved = self.model_copy(update={name: root / value for name, value in self})
        resolved._root = root
        return resolved

    @property
    def root(self) -> Path:
        """The repository root the paths were resolved against (the folder holding params.yaml)."""
        if self._root is None:
            raise ValueError("paths are not resolved against a repository root: use load_params(ROOT / 'params.yaml') or paths.under(ROOT)")
        return self._root

    def relative(self, path: Path | str) -> str:
        """`path` as dvc.yaml and dvc.lock name it: relative to the root, POSIX separators."""
        path = Path(path)
        if self._root is not None and path.is_absolute() and path.is_relative_to(self._root):
            return path.relative_to(self._root).as_posix()
        return path.as_posix()

    def as_params(self) -> dict[str, Any]:
        """The section as params.yaml holds it (relative paths): what is logged, so runs compare across checkouts."""
        return {name: self.relative(value) for name, value in self}
