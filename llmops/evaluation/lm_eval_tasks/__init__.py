"""The offline lm-eval task configs (YAML, read by `TaskManager(include_path=...)` in llmops.evaluation.lm_eval) and
their code (offline.py)."""
