"""One thin module per dvc.yaml stage, named as the stage: run(<its params sections>, paths) -> StageResult (see llmops/common/stages.py)."""
