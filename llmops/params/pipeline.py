"""params.yaml `pipeline`: what the Prefect pipeline flow does around the stages."""

from __future__ import annotations

from pydantic import Field

from llmops.params.base import Section


class PipelineConfig(Section):
    push: bool = True  # `dvc push` to the default remote after a successful run
    stage_retries: int = Field(0, ge=0)  # stage logic is deterministic: retrying a failure repeats it
