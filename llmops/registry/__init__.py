"""The model registry on MLflow: versions and aliases, the champion gate, lineage, and reproducing a version."""
