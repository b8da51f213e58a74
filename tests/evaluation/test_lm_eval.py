"""lm-evaluation-harness in the evaluate stage: the offline tasks on a micro model over the micro project's own
held-out split, their metrics as `lm_eval.<task>.<metric>`, and unknown task names refused before any work."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from llmops.common.errors import ConfigError
from llmops.common.results import StageResult
from llmops.data.token_shards import TokenShards
from llmops.evaluation import lm_eval
from llmops.evaluation.lm_eval_tasks.offline import heldout_documents
from llmops.params.evaluate import OFFLINE_LM_EVAL_TASKS, EvaluateConfig
from llmops.params.load import load_params

from ..serving.conftest import build_micro_model
from ..training.conftest import micro_params, tokenized, write_params  # noqa: F401 (tokenized: a session fixture)

pytestmark = pytest.mark.eval

LIMIT = 3
CFG = EvaluateConfig(lm_eval_limit=LIMIT, max_new_tokens=16, eval_tokens=3000, batch_size=4, timeout_s=3.0, workers=2)


def build_long_context_model(out: Path) -> Path:
    """The serving tests' random micro Llama and 300-token BPE, declaring a context of 1024 tokens so HumanEval prompts
    fit untruncated (RoPE: the weights do not depend on the declared context)."""
    build_micro_model(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 1024}, indent=2))
    return out


@pytest.fixture(scope="module")
def project(tokenized, tmp_path_factory) -> Path:  # noqa: F811
    """The tokenized micro project with a micro model in models/finetune (the candidate evaluate scores). The
held-out task decodes the val token shards with the project tokenizer; the model reads that text with its own."""
    root = tmp_path_factory.mktemp("lm_eval") / "proj"
    shutil.copytree(tokenized, root)
    build_long_context_model(root / "models" / "finetune")
    return root


@pytest.fixture(scope="module")
def results(project) -> dict:
    paths = load_params(project / "params.yaml").paths
    return lm_eval.score_candidate(paths.finetune_model, CFG, paths.tokens, paths.tokenizer)


def test_held_out_documents_are_the_val_split_decoded(project):
    """Encoding the decoded documents again, with an EOS after each, gives back the val split's token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(project / "models" / "tokenizer"))
    meta = json.loads((project / "data" / "tokens" / "meta.json").read_text())
    val = TokenShards(project / "data" / "tokens", "val")[:]
    documents = heldout_documents(project / "data" / "tokens", project / "models" / "tokenizer")
    assert len(documents) == meta["val_docs"] >= 2
    ids = [i for text in documents for i in [*tokenizer.encode(text, add_special_tokens=False), meta["eos_token_id"]]]
    assert ids == val.tolist()
    assert len(heldout_documents(project / "data" / "tokens", project / "models" / "tokenizer", max_tokens=50)) == 1


def test_offline_tasks_score_the_candidate_with_sane_metrics(results):
    metrics = lm_eval.task_metrics(results)
    assert set(metrics) == set(OFFLINE_LM_EVAL_TASKS)
    assert metrics["llmops_humaneval"] == {"pass_at_1": 0.0}  # a random model writes no passing body
    ppl = metrics["llmops_heldout_ppl"]
    assert set(ppl) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    # a random model is near uniform over its 300 tokens: each byte costs less than a token, each word more
    assert 1 < ppl["byte_perplexity"] < 300 < ppl["word_perplexity"]
    assert ppl["bits_per_byte"] == pytest.approx(math.log2(ppl["byte_perplexity"]))
    assert results["n-samples"]["llmops_humaneval"]["effective"] == LIMIT
    assert 1 <= results["n-samples"]["llmops_heldout_ppl"]["effective"] <= LIMIT
    # greedy completions of the first problems, generation capped at evaluate.max_new_tokens
    samples = results["samples"]["llmops_humaneval"]
    assert [s["doc"]["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert results["configs"]["llmops_humaneval"]["generation_kwargs"]["max_gen_toks"] == 16


def test_metrics_become_dotted_mlflow_names_and_the_results_file_is_json(results, tmp_path):
    result = StageResult(metrics={"lm_eval": lm_eval.task_metrics(results)}, summary="")
    assert set(result.numeric_metrics()) == {
        "lm_eval.llmops_humaneval.pass_at_1",
        "lm_eval.llmops_heldout_ppl.word_perplexity",
        "lm_eval.llmops_heldout_ppl.byte_perplexity",
        "lm_eval.llmops_heldout_ppl.bits_per_byte",
    }
    written = json.loads(lm_eval.write_results(results, tmp_path / "lm_eval.json").read_text())
    assert written["results"]["llmops_humaneval"]["pass_at_1,none"] == 0.0


def test_the_results_file_is_the_same_bytes_for_the_same_model_anywhere(results, project, tmp_path):
    """reports/evaluate is a DVC output `llmops reproduce` compares by md5: lm-eval's dates, timings, git hashes and
    machine description are left out, and paths under the repository are written relative to it."""
    assert {"date", "pretty_env_info"} <= set(results)  # what lm-eval gives
    moved = json.loads(json.dumps(results, default=str).replace(str(project), str(tmp_path / "elsewhere")))
    moved["date"] = results["date"] + 3600.0
    first = lm_eval.write_results(results, tmp_path / "a.json", project).read_bytes()
    second = lm_eval.write_results(moved, tmp_path / "b.json", tmp_path / "elsewhere").read_bytes()
    assert first == second
    assert str(project) not in first.decode() and b'"date"' not in first and b"pretty_env_info" not in first
    assert str(lm_eval.TASKS_DIR) in json.dumps(results, default=str) and str(lm_eval.TASKS_DIR) not in first.decode()


def test_task_metrics_keeps_numbers_and_names_non_default_filters():
    results = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A", "acc,none": 0.5}}}
    assert lm_eval.task_metrics(results) == {"gsm8k": {"exact_match_strict-match": 0.25, "acc": 0.5}}


def test_unknown_task_fails_before_any_work_and_lists_the_available_ones(project):
    from tasks import evaluate

    params = load_params(write_params(project, micro_params(evaluate={"lm_eval": ["llmops_humaneval", "no_such_task"]})))
    shutil.rmtree(project / "models" / "finetune")  # any work would fail on the missing model first
    try:
        with pytest.raises(ConfigError) as error:
            evaluate.run(params.evaluate, params.model, params.finetune, params.train, params.paths)
    finally:
        build_long_context_model(project / "models" / "finetune")
    message = str(error.value)
    assert "'no_such_task'" in message and "llmops_humaneval, llmops_heldout_ppl" in message
    known = int(message.split("lm-eval knows ")[1].split()[0])
    assert known > 1000  # lm-eval's own task index was consulted


def test_config_refuses_a_task_named_twice():
    with pytest.raises(ValueError, match="twice"):
        EvaluateConfig(lm_eval=["llmops_humaneval", "llmops_humaneval"])


def test_lm_eval_console_keeps_real_warnings_and_drops_its_bars_and_notices(capfd, monkeypatch):
    """Inside quiet_lm_eval a library's bar is off and lm-eval's fixed notices are dropped, while a warning that says
    something about this run (truncated prompts) reaches stderr; lm-eval's logger is put back as it was."""
    import logging

    from tqdm import tqdm

    from llmops.common import env

    monkeypatch.delenv(env.LIBRARY_PROGRESS, raising=False)
    log = logging.getLogger("lm_eval")
    before = log.level, log.propagate, list(log.handlers)
    with lm_eval.quiet_lm_eval():
        task_log = logging.getLogger("lm_eval.api.task")
        task_log.warning("[Task: llmops_heldout_ppl] metric bits_per_byte is defined, but aggregation is not. using default")
        task_log.warning("Left truncation applied. Original sequence length was 188, truncating to last 128 tokens.")
        task_log.info("Building contexts for llmops_humaneval on rank 0...")
        list(tqdm(range(3), desc="LIBRARY-BAR"))  # made outside llmops: a library's bar
    err = capfd.readouterr().err
    assert "Left truncation applied" in err
    assert "aggregation is not" not in err and "Building contexts" not in err and "LIBRARY-BAR" not in err, err
    assert (log.level, log.propagate, list(log.handlers)) == before
