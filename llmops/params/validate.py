"""params.yaml `validate`: the data contract's bounds and the pass rate the stage requires."""

from __future__ import annotations

from pydantic import Field, model_validator

from llmops.params.base import Section


class ValidateConfig(Section):
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(2_000_000, gt=0)
    max_line_chars: int = Field(10_000, gt=0)
    max_control_char_ratio: float = Field(0.001, ge=0, le=1)  # control chars other than \t \n \r \f
    min_alnum_ratio: float = Field(0.05, ge=0, le=1)
    min_pass_rate: float = Field(0.95, ge=0, le=1)
    shard_max_bytes: int = Field(16_000_000, gt=0)
    workers: int = Field(0, ge=0)  # shards checked at once (profile + both GX suites; local processes, or Ray tasks); 0 = one per CPU core

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self
