"""A client someone else wrote against the served endpoint: lm-eval's `local-completions` runs llmops_humaneval on
a micro model behind the key-checking proxy (CPU backend), and agrees with lm-eval's in-process HF backend on the
same model.

Tolerance: none. Both paths decode greedily from the same weights in fp32 on the same prompts (prompt text sent as
is; the tokenizer adds no special tokens either way), so the completions must be the same text once cut at the stop
sequences (the endpoint may stop at a `stop` string a token later than the HF backend's own stop check, which
the cut removes), and pass@1 must be equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmops.evaluation import lm_eval
from llmops.evaluation.scoring import truncate_at_stop
from llmops.params.evaluate import EvaluateConfig
from llmops.params.load import load_params
from llmops.serving.backends import inspect_model
from llmops.serving.server import Server, serving

from ..evaluation.test_lm_eval import build_long_context_model
from ..serving.conftest import API_KEY, write_project

pytestmark = pytest.mark.integration

PROBLEMS = 3
CFG = EvaluateConfig(max_new_tokens=16, batch_size=1, timeout_s=3.0, workers=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_long_context_model(tmp_path_factory.mktemp("lm_eval_client") / "micro")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[Server]:
    project = write_project(tmp_path_factory.mktemp("project"), cb_num_blocks=64)  # 64 x 32 tokens: a whole prompt + completion
    cfg = load_params(project / "params.yaml").serve
    with serving(inspect_model(model_dir, "micro"), cfg, "transformers", API_KEY, log_dir=project / "logs", cwd=project) as running:
        yield running


def completions(results: dict) -> list[str]:
    return [truncate_at_stop(sample["resps"][0][0]) for sample in results["samples"]["llmops_humaneval"]]


def test_lm_eval_client_on_the_endpoint_matches_the_in_process_score(server, model_dir):
    served = lm_eval.score_endpoint(server.url, API_KEY, model_dir, ["llmops_humaneval"], PROBLEMS, cfg=CFG)  # model: from /v1/models
    local = lm_eval.score_model(model_dir, ["llmops_humaneval"], CFG.model_copy(update={"lm_eval_limit": PROBLEMS}), {})
    assert served["n-samples"]["llmops_humaneval"]["effective"] == local["n-samples"]["llmops_humaneval"]["effective"] == PROBLEMS
    served_text, local_text = completions(served), completions(local)
    assert all(served_text), served_text  # the endpoint answered every problem with text
    assert served_text == local_text
    assert lm_eval.task_metrics(served) == lm_eval.task_metrics(local)


def test_lm_eval_client_without_the_key_is_refused(server, model_dir):
    with pytest.raises(Exception, match="401"):
        lm_eval.score_endpoint(server.url, "not-the-key", model_dir, ["llmops_humaneval"], 1, model="micro", cfg=CFG)
