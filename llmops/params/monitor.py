"""params.yaml `monitor`: where batches are staged and the threshold of each drift check."""

from __future__ import annotations

from pydantic import Field

from llmops.params.base import Section


class MonitorConfig(Section):
    """The drift monitor: where a batch is staged, the threshold of each check, where results are tracked.

    The thresholds are the calibrated values params.yaml documents (benchmarks/bench_monitor_calibration.py)."""

    experiment: str = "llmops-monitor"  # MLflow experiment: one run per batch
    workdir: str = "data/monitor"  # side area for batches (raw/validated/tokens per batch id); never a training path
    batches_dir: str = "data/batches"  # a flagged batch is copied here and added to ingest.source for the retrain
    heldout_batch: str = "data/monitor/heldout.jsonl"  # tokenize's validation-split documents, exported for `llmops monitor --heldout`
    model: str = ""  # model whose perplexity is checked; "" = <model_name>@production, else @champion, else paths.finetune_model
    length_ks_max: float = Field(0.3, gt=0, le=1)  # KS statistic between token-length distributions (binned CDFs)
    length_ks_alpha: float = Field(0.01, gt=0, lt=1)  # a small batch is flagged only above the KS value chance exceeds this rarely
    unigram_js_max: float = Field(0.2, gt=0, le=1)  # Jensen-Shannon divergence (base 2) of unigram distributions
    oov_rate_increase_max: float = Field(0.05, ge=0, le=1)  # (unk + byte-fallback rate) of the batch minus the reference
    min_pass_rate: float = Field(0.9, ge=0, le=1)  # validation pass rate of the batch
    near_duplicate_share_max: float = Field(0.9, ge=0, le=1)  # share of batch docs near-duplicating a training doc (replayed data)
    perplexity_ratio_max: float = Field(1.5, gt=0)  # model perplexity on the batch / on the held-out split
    perplexity_tokens: int = Field(50_000, ge=0)  # tokens scored on each side (0 = all)
    # Traffic checks: only for batches written by serving's request capture (records carry refused/status/tokens/latency).
    prompt_length_ks_max: float = Field(0.3, gt=0, le=1)  # KS of prompt token lengths vs finetune's training prompts
    refused_share_max: float = Field(0.05, ge=0, le=1)  # share of captured requests the proxy refused
    latency_p95_ratio_max: float = Field(2.0, gt=0)  # p95 latency of answered requests / the deploy load test's p95
    tokens_per_s_ratio_min: float = Field(0.5, ge=0)  # median tokens/s of a request / the load test's tokens/s per client
    load_test_run: str = ""  # MLflow run id of the load test to compare with; "" = the deploy run that promoted @production
    retrain: bool = True  # past a threshold: emit llmops.drift.detected and run the pipeline with the batch added
    after_run: bool = True  # `llmops run` ends with the monitor on the held-out batch (record only, never retrains)
