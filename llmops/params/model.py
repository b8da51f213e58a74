"""params.yaml `model`: the base model fine-tuning starts from (empty = pretrain our own)."""

from __future__ import annotations

from pathlib import Path

from llmops.params.base import Section


class ModelConfig(Section):
    base: str = ""  # a local HF model directory; empty = pretrain from scratch with our own tokenizer

    def base_at(self, root: Path) -> str:
        """`base` as transformers should load it: a directory relative to the repository `root` made absolute, else as given."""
        if not self.base:
            return ""
        local = Path(root) / self.base
        return str(local) if local.exists() else self.base
