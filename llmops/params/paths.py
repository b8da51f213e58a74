"""params.yaml `paths`: where each stage reads and writes, relative to the repository root (dvc.yaml templates these).

Loaded with `load_params(root / "params.yaml")`, every path is made absolute against `root`, the folder that holds
params.yaml: code never depends on the working directory. `relative(path)` gives back the form dvc.yaml and
dvc.lock use. A loaded params.yaml may only name folders below the root, symlinks followed (`outside_root`): stages
replace these folders, and DVC 3 tracks no output outside the repository. A key listed in `allow_outside_root` is
exempt (e.g. checkpoints on a scratch disk), by the user's explicit choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import PrivateAttr, field_validator

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
    aligned_model: Path = Path("models/aligned")  # align: the fine-tuned model after DPO / GRPO (LoRA merged)
    student_model: Path = Path("models/student")  # distill: the shallower student of the fine-tuned model (the speculative draft)
    checkpoints: Path = Path("checkpoints")  # resumable training state; not a DVC output, never half-taken as done
    quantized: Path = Path("models/quantized")  # one compressed-tensors HF directory per scheme (w8a8/, w4a16/)
    registry: Path = Path("models/registry")  # registry downloads: <name>/<version>/ (a plain HF directory)
    allow_outside_root: tuple[str, ...] = ()  # keys above that may resolve outside the repository root (opt-in)

    _root: Path | None = PrivateAttr(default=None)

    @classmethod
    def path_keys(cls) -> tuple[str, ...]:
        """The keys that name a folder (every field but `allow_outside_root`)."""
        return tuple(name for name, field in cls.model_fields.items() if field.annotation is Path)

    @field_validator("allow_outside_root")
    @classmethod
    def _known_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [key for key in keys if key not in cls.path_keys()]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} is not a paths key; paths keys: {', '.join(cls.path_keys())}")
        return keys

    def folders(self) -> dict[str, Path]:
        """Each key that names a folder -> its path."""
        return {name: getattr(self, name) for name in self.path_keys()}

    def under(self, root: Path) -> PathsConfig:
        """These paths made absolute against the repository root `root`; absolute ones stay as they are."""
        root = Path(root).resolve()
        resolved = self.model_copy(update={name: root / value for name, value in self.folders().items()})
        resolved._root = root
        return resolved

    @property
    def root(self) -> Path:
        """The repository root the paths were resolved against (the folder holding params.yaml)."""
        if self._root is None:
            raise ValueError("paths are not resolved against a repository root: use load_params(ROOT / 'params.yaml') or paths.under(ROOT)")
        return self._root

    def outside_root(self) -> list[str]:
        """One line per path that does not resolve, symlinks followed, to a folder below the root (the root itself
        included: a stage would replace the whole checkout), unless its key is in `allow_outside_root`."""
        problems = []
        for name, path in self.folders().items():
            real = path.resolve()
            if name in self.allow_outside_root or (real != self.root and real.is_relative_to(self.root)):
                continue
            where = "is the repository root itself" if real == self.root else f"resolves to {real}, outside the repository root {self.root}"
            problems.append(f"paths.{name}: {self.relative(path)!r} {where}")
        return problems

    def relative(self, path: Path | str) -> str:
        """`path` as dvc.yaml and dvc.lock name it: relative to the root, POSIX separators."""
        path = Path(path)
        if self._root is not None and path.is_absolute() and path.is_relative_to(self._root):
            return path.relative_to(self._root).as_posix()
        return path.as_posix()

    def as_params(self) -> dict[str, Any]:
        """The section as params.yaml holds it (relative paths): what is logged, so runs compare across checkouts."""
        return {**{name: self.relative(value) for name, value in self.folders().items()}, "allow_outside_root": list(self.allow_outside_root)}
