"""The drift checks as pure functions: each score moves the way its threshold assumes."""

import math
import random

import pytest

from llmops.monitoring import checks
from llmops.monitoring import drift as monitor
from llmops.params.dedup import DedupConfig
from llmops.params.load import parse_params
from llmops.params.monitor import MonitorConfig
from llmops.common.errors import ConfigError

from ..conftest import perturb, random_document

pytestmark = pytest.mark.unit


def test_binned_ks_is_zero_for_the_same_shape_and_one_for_disjoint_histograms():
    assert checks.binned_ks([1, 2, 3, 0], [10, 20, 30, 0]) == pytest.approx(0.0)
    assert checks.binned_ks([5, 5, 0, 0], [0, 0, 3, 3]) == pytest.approx(1.0)
    assert math.isnan(checks.binned_ks([1, 2], [0, 0]))


def test_psi_grows_with_the_shift():
    reference = [10, 40, 40, 10]
    assert checks.psi(reference, reference) == pytest.approx(0.0)
    assert 0 < checks.psi(reference, [15, 35, 40, 10]) < checks.psi(reference, [40, 40, 10, 10])


def test_jensen_shannon_is_zero_for_proportional_counts_and_one_for_disjoint_vocabularies():
    assert checks.jensen_shannon([2, 4, 6, 0], [1, 2, 3, 0]) == pytest.approx(0.0, abs=1e-12)
    assert checks.jensen_shannon([3, 3, 0, 0], [0, 0, 1, 9]) == pytest.approx(1.0)
    assert 0 < checks.jensen_shannon([3, 3, 1, 1], [1, 1, 3, 3]) < 1


def test_near_duplicate_share_counts_batch_docs_that_repeat_or_nearly_repeat_a_training_doc(vocabulary):
    rng = random.Random(3)
    train = [random_document(rng, vocabulary, 300) for _ in range(20)]
    batch = [train[0], perturb(rng, train[1], vocabulary, 0.02)] + [random_document(rng, vocabulary, 300) for _ in range(6)]
    share = checks.near_duplicate_share(DedupConfig(workers=1), train, batch)
    assert share == pytest.approx(2 / 8)


def test_checks_flag_past_their_threshold_in_the_right_direction_and_never_on_a_missing_score():
    cfg = MonitorConfig(length_ks_max=0.3, min_pass_rate=0.9)
    by_name = {c.name: c for c in checks.build_checks({"token_length_ks": 0.31, "validation_pass_rate": 0.89, "unigram_js": 0.01}, cfg)}
    assert by_name["token_length_ks"].flagged and by_name["validation_pass_rate"].flagged
    assert not by_name["unigram_js"].flagged
    assert math.isnan(by_name["perplexity_ratio"].score) and not by_name["perplexity_ratio"].flagged
    ok = checks.build_checks({"token_length_ks": 0.3, "validation_pass_rate": 0.9}, cfg)
    assert not any(c.flagged for c in ok)


@pytest.mark.parametrize("key,value", [("workdir", "data/tokens/monitor"), ("workdir", "data"), ("batches_dir", "data/raw")])
def test_a_side_area_inside_or_around_training_data_is_refused(tmp_path, key, value):
    params = parse_params({"monitor": {key: value}}, root=tmp_path)
    with pytest.raises(ConfigError, match=f"monitor.{key}"):
        monitor.check_side_area(params)


def test_a_small_batch_is_flagged_for_length_only_past_what_chance_explains():
    cfg = MonitorConfig()
    critical = checks.ks_critical_value(2000, 3, cfg.length_ks_alpha)
    assert critical == pytest.approx(math.sqrt(-math.log(0.005) / 2) * math.sqrt(2003 / 6000))  # ~0.94 for 3 documents
    small = {c.name: c for c in checks.build_checks({"token_length_ks": 0.6}, cfg, ks_critical=critical)}["token_length_ks"]
    assert not small.flagged and "sampling noise" in small.note
    large_critical = checks.ks_critical_value(2000, 500, cfg.length_ks_alpha)
    assert large_critical < cfg.length_ks_max  # a real batch: the configured threshold decides
    assert {c.name: c for c in checks.build_checks({"token_length_ks": 0.6}, cfg, ks_critical=large_critical)}["token_length_ks"].flagged


def test_near_duplicate_share_from_saved_train_signatures_equals_hashing_the_train_split_again(vocabulary):
    from llmops.data.minhash import signatures
    from llmops.monitoring.checks import near_duplicate_share

    rng = random.Random(2)
    train = [random_document(rng, vocabulary, 200) for _ in range(30)]
    batch = [perturb(rng, train[i], vocabulary, 0.02) for i in range(5)] + [random_document(rng, vocabulary, 200) for _ in range(5)]
    cfg = DedupConfig(workers=1)
    fresh = near_duplicate_share(cfg, train, batch)
    reused = near_duplicate_share(cfg, train, batch, signatures(cfg, train))
    assert fresh == reused == 0.5
