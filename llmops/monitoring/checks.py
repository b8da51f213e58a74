"""The drift checks as pure functions: KS and PSI of token-length histograms, Jensen-Shannon of unigram counts, the
share of batch documents that near-duplicate training documents, and each score (the traffic checks' too) against
its threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmops.common.errors import DataError
from llmops.data.minhash import exact_key, has_words, near_duplicate_pairs, signatures
from llmops.params.dedup import DedupConfig
from llmops.params.monitor import MonitorConfig


@dataclass(frozen=True)
class Check:
    name: str
    score: float  # NaN when it could not be computed (the reason is in `note`)
    threshold: float
    kind: str  # "max": flagged above the threshold; "min": flagged below it
    note: str = ""

    @property
    def flagged(self) -> bool:
        if math.isnan(self.score):
            return False
        return self.score > self.threshold if self.kind == "max" else self.score < self.threshold


def binned_ks(reference_hist: list[int] | np.ndarray, batch_hist: list[int] | np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic between two histograms on the same bins: max |CDF_ref - CDF_batch|."""
    ref, new = np.asarray(reference_hist, dtype=float), np.asarray(batch_hist, dtype=float)
    if ref.sum() == 0 or new.sum() == 0:
        return float("nan")
    return float(np.max(np.abs(np.cumsum(ref) / ref.sum() - np.cumsum(new) / new.sum())))


def ks_critical_value(n_reference: float, n_batch: float, alpha: float) -> float:
    """The two-sample KS statistic that chance alone exceeds with probability `alpha` (asymptotic Kolmogorov bound).

    A batch of a few documents moves the length CDF in big steps; below this value the difference is sampling noise.
    """
    if n_reference <= 0 or n_batch <= 0:
        return float("nan")
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n_reference + n_batch) / (n_reference * n_batch))


def psi(reference_hist: list[int] | np.ndarray, batch_hist: list[int] | np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index over the same bins (empty bins floored at `eps`); reported beside KS."""
    ref, new = np.asarray(reference_hist, dtype=float), np.asarray(batch_hist, dtype=float)
    if ref.sum() == 0 or new.sum() == 0:
        return float("nan")
    p, q = np.maximum(ref / ref.sum(), eps), np.maximum(new / new.sum(), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def jensen_shannon(reference_counts: list[int] | np.ndarray, batch_counts: list[int] | np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two unigram count vectors over one vocabulary."""
    from scipy.spatial.distance import jensenshannon

    ref, new = np.asarray(reference_counts, dtype=float), np.asarray(batch_counts, dtype=float)
    if ref.shape != new.shape:
        raise DataError(f"unigram counts over different vocabularies ({ref.size} vs {new.size}): re-run tokenize (`dvc repro tokenize`).")
    if ref.sum() == 0 or new.sum() == 0:
        return float("nan")
    return float(jensenshannon(ref, new, base=2) ** 2)


def near_duplicate_share(cfg: DedupConfig, train_texts: list[str], batch_texts: list[str], train_sigs: np.ndarray | None = None) -> float:
    """Share of batch documents that near-duplicate (or exactly repeat) a training document.

    Dedup's own MinHash LSH over training docs followed by batch docs: a verified pair (train i, batch j) marks j.
    `train_sigs` are the training documents' signatures as dedup saved them; only the batch is hashed then.
    """
    if not batch_texts:
        return float("nan")
    train_keys = {exact_key(t) for t in train_texts}
    exact = {j for j, t in enumerate(batch_texts) if exact_key(t) in train_keys}
    texts = train_texts + batch_texts
    sigs = signatures(cfg, texts) if train_sigs is None else np.concatenate([np.asarray(train_sigs), signatures(cfg, batch_texts)])
    pairs = near_duplicate_pairs(cfg, sigs, np.flatnonzero([has_words(t) for t in texts]))
    n = len(train_texts)
    near = {int(j) - n for i, j in pairs if i < n <= j}
    return len(exact | near) / len(batch_texts)


def build_checks(
    scores: dict[str, float],
    cfg: MonitorConfig,
    notes: dict[str, str] | None = None,
    ks_critical: float = float("nan"),
    prompt_ks_critical: float = float("nan"),
) -> list[Check]:
    """One Check per drift measure, then the traffic checks. A KS check's bar is the larger of its threshold and the
    critical value for its sample sizes (`ks_critical` for document lengths, `prompt_ks_critical` for prompt lengths),
    so a small batch is flagged only for a length shift chance cannot explain (at monitor.length_ks_alpha)."""
    notes = dict(notes or {})

    def ks_bar(name: str, threshold: float, critical: float) -> float:
        if critical > threshold:
            notes.setdefault(name, f"small batch: KS below {critical:.3f} is sampling noise at alpha {cfg.length_ks_alpha}")
            return critical
        return threshold

    spec = [
        ("token_length_ks", ks_bar("token_length_ks", cfg.length_ks_max, ks_critical), "max"),
        ("unigram_js", cfg.unigram_js_max, "max"),
        ("oov_rate_increase", cfg.oov_rate_increase_max, "max"),
        ("validation_pass_rate", cfg.min_pass_rate, "min"),
        ("near_duplicate_share", cfg.near_duplicate_share_max, "max"),
        ("perplexity_ratio", cfg.perplexity_ratio_max, "max"),
        ("prompt_length_ks", ks_bar("prompt_length_ks", cfg.prompt_length_ks_max, prompt_ks_critical), "max"),
        ("refused_share", cfg.refused_share_max, "max"),
        ("latency_p95_ratio", cfg.latency_p95_ratio_max, "max"),
        ("tokens_per_s_ratio", cfg.tokens_per_s_ratio_min, "min"),
    ]
    return [Check(name, float(scores.get(name, float("nan"))), threshold, kind, notes.get(name, "")) for name, threshold, kind in spec]
