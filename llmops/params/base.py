"""The base of every params.yaml section model: unknown keys fail, values are frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys fail fast: a typo in params.yaml must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)
