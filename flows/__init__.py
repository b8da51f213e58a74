"""The Prefect flows (pipeline, deploy, monitor) and the `llmops` command line."""
