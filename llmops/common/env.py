"""Every environment variable llmops reads or sets, in one place: the offline switches, progress bars (ours and the
libraries'), the MLflow and Prefect servers, the pipeline's parent run, the serving key, vLLM, and the distributed
launch."""

from __future__ import annotations

import os

# Nothing may phone home; the CLI sets these before any library is imported (a value already set wins).
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TOKENIZERS_PARALLELISM": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}
PROGRESS = "LLMOPS_PROGRESS"  # "0": no progress bars at all, ours included (tests, log files)
LIBRARY_PROGRESS = "LLMOPS_LIBRARY_PROGRESS"  # "1": the libraries' own bars and chatter back on (debugging a library)
# The libraries' own switches for their progress bars and chatter; ours (llmops.common.progress, the training bar)
# stay on. Read by the libraries at import, so the CLI sets them first and every process `dvc repro` starts inherits
# them (a value already set wins). Learned from the installed sources:
QUIET_LIBRARIES = {
    # huggingface_hub's bars; transformers' follow it ("Loading weights", "Writing model shards": utils/logging.py
    # starts with `_tqdm_active = not huggingface_hub.utils.are_progress_bars_disabled()`)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' map/filter bars
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # MLflow's artifact upload/download bars
    "LLM_COMPRESSOR_LOG_LEVEL": "WARNING",  # llm-compressor's loguru console sink (per-layer INFO lines)
}
# What `dvc repro` prints after every stage that ran; the pipeline flow pushes itself when pipeline.push is on.
DVC_PUSH_HINT = "Use `dvc push` to send your updates to remote storage."
SUMMARY_FILE = "LLMOPS_SUMMARY_FILE"  # set by the pipeline flow: `llmops stage` appends its summary there for the flow's log
PARENT_RUN = "LLMOPS_PARENT_RUN_ID"  # the pipeline flow's MLflow run: stage runs nest under it
API_KEY = "LLMOPS_API_KEY"  # the serving key (else serve.api_key_file)
VLLM_BIN = "LLMOPS_VLLM_BIN"  # a `vllm` executable outside this environment
RDZV_ENDPOINT = "LLMOPS_RDZV_ENDPOINT"  # host:port of the rendezvous node for multi-node training
RDZV_ID = "LLMOPS_RDZV_ID"
MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"  # a shared `mlflow server`, over params' tracking.uri
MLFLOW_JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"  # `llmops ui` sets "false" unless set: MLflow's GenAI job workers
PREFECT_API_URL = "PREFECT_API_URL"  # a `prefect server`; unset = Prefect's ephemeral API
RAY_ADDRESS = "RAY_ADDRESS"  # a Ray cluster (host:port or "auto"): the data stages run their shard jobs there
DATA_ENGINE = "LLMOPS_DATA_ENGINE"  # "processes" (default: a local process pool) or "ray" (a local Ray unless RAY_ADDRESS)


def set_offline() -> None:
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def set_quiet_libraries() -> None:
    """The libraries' progress bars and chatter off (QUIET_LIBRARIES), unless LLMOPS_LIBRARY_PROGRESS=1."""
    if library_progress_enabled():
        return
    for key, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(key, value)


def get(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def take(name: str) -> str:
    """Read a variable and remove it from this process's environment (a secret its children must not inherit)."""
    return os.environ.pop(name, "")


def progress_enabled() -> bool:
    return os.environ.get(PROGRESS, "1") != "0"


def library_progress_enabled() -> bool:
    """Whether the libraries' own bars show: only with LLMOPS_LIBRARY_PROGRESS=1, and never under LLMOPS_PROGRESS=0."""
    return os.environ.get(LIBRARY_PROGRESS, "0") == "1" and progress_enabled()


def summary_file() -> str:
    return os.environ.get(SUMMARY_FILE, "")


def parent_run_id() -> str:
    return os.environ.get(PARENT_RUN, "")


def tracking_uri_override() -> str:
    return os.environ.get(MLFLOW_TRACKING_URI, "")


def prefect_api_url() -> str:
    return os.environ.get(PREFECT_API_URL, "")


def rank() -> int:
    """This process's rank under torchrun / accelerate (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def in_launched_process() -> bool:
    return "LOCAL_RANK" in os.environ


def data_engine() -> str:
    """Where the data stages run their per-shard jobs: "ray" when RAY_ADDRESS or LLMOPS_DATA_ENGINE=ray says so,
    else "processes". Where work runs never changes what it computes, so it is no params.yaml key (no DVC re-run)."""
    engine = get(DATA_ENGINE).strip().lower()
    if engine and engine not in ("processes", "ray"):
        raise ValueError(f"${DATA_ENGINE}={engine!r}: expected processes or ray")
    return engine or ("ray" if get(RAY_ADDRESS).strip() else "processes")


def ray_address() -> str:
    return get(RAY_ADDRESS).strip()
