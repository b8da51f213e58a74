"""params.yaml `tracking`: where MLflow runs and registry versions are stored."""

from __future__ import annotations

from llmops.params.base import Section


class TrackingConfig(Section):
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI in the environment wins (shared servers)
    artifact_root: str = "mlartifacts"
    experiment: str = "llmops"
