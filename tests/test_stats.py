"""The evidence protocol's statistics against values worked out by hand."""
import math

import numpy as np
import pytest

from hclafter.core import stats


def test_mcnemar_exact_hand_values():
    # n01 = 1 (only a right), n10 = 6 (only b right): n = 7 discordant pairs,
    # P(X <= 1) = (C(7,0) + C(7,1)) / 2^7 = (1 + 7) / 128, p = 2 * 8/128 = 0.125.
    a = [1] * 1 + [0] * 6 + [1] * 5 + [0] * 3  # 5 both right, 3 both wrong: concordant, ignored
    b = [0] * 1 + [1] * 6 + [1] * 5 + [0] * 3
    assert stats.mcnemar_exact(a, b) == pytest.approx(16 / 128, abs=1e-12)
    assert stats.mcnemar_exact(b, a) == pytest.approx(16 / 128, abs=1e-12)  # two-sided: symmetric
    # n01 = 10, n10 = 2: P(X <= 2) = (1 + 12 + 66) / 4096, p = 158 / 4096.
    assert stats.mcnemar_exact([1] * 10 + [0] * 2, [0] * 10 + [1] * 2) == pytest.approx(158 / 4096, abs=1e-12)
    # n01 = n10 = 3: 2 * (1 + 6 + 15 + 20) / 64 > 1, capped at 1.
    assert stats.mcnemar_exact([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]) == 1.0
    assert stats.mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0  # no discordant pair


def test_bootstrap_ci_hand_example():
    # Differences d = a - b = [1, 1, 0, -1]: mean 0.25. Resampling 4 images gives k+ ones,
    # k0 zeros, k- minus-ones ~ Multinomial(4; 1/2, 1/4, 1/4), mean (k+ - k-)/4. Lower tail:
    # P(mean = -1) = 1/256, P(mean = -0.75) = 4/256 (k- = 3, k0 = 1): 5/256 = 0.0195 < 0.025, and
    # P(mean = -0.5) = 6/256 (k- = 2, k0 = 2) + 8/256 (k- = 3, k+ = 1) brings it to 19/256 = 0.074,
    # so the 2.5 % quantile is -0.5. Upper tail: P(mean = 1) = (1/2)^4 = 0.0625 > 0.025, so the
    # 97.5 % quantile is 1. 10000 replicates put the empirical tails far from these boundaries.
    a, b = [1, 1, 1, 0], [0, 0, 1, 1]
    diff = stats.paired_bootstrap_ci(a, b, n_boot=10000, seed=0)
    assert (diff.mean, diff.low, diff.high) == (0.25, -0.5, 1.0)
    assert diff.ci == (-0.5, 1.0) and diff.level == 0.95


def test_bootstrap_matches_normal_approximation_and_is_seeded():
    rng = np.random.default_rng(1)
    a, b = rng.random(3000) < 0.7, rng.random(3000) < 0.65
    diff = stats.paired_bootstrap_ci(a, b, n_boot=20000, seed=3)
    d = a.astype(float) - b
    half = 1.96 * d.std() / math.sqrt(len(d))
    assert diff.mean == pytest.approx(d.mean())
    assert (diff.high - diff.low) / 2 == pytest.approx(half, rel=0.05)
    assert diff.low < diff.mean < diff.high
    assert diff == stats.paired_bootstrap_ci(a, b, n_boot=20000, seed=3)
    assert diff != stats.paired_bootstrap_ci(a, b, n_boot=20000, seed=4)


def test_bootstrap_groups_resample_images_not_seed_copies():
    # Three seeds that agree exactly hold no more evidence than one: with the image as the unit
    # the CI is the one-seed CI; treating the 3x4 predictions as independent narrows it.
    a, b = np.array([1, 1, 1, 0]), np.array([0, 0, 1, 1])
    one = stats.paired_bootstrap_ci(a, b, seed=0)
    ids = ["x", "y", "z", "w"] * 3
    grouped = stats.paired_bootstrap_ci(np.tile(a, 3), np.tile(b, 3), seed=0, groups=ids)
    assert grouped == one
    naive = stats.paired_bootstrap_ci(np.tile(a, 3), np.tile(b, 3), seed=0)
    assert naive.high - naive.low < one.high - one.low


def test_bootstrap_and_mcnemar_reject_bad_input():
    with pytest.raises(ValueError, match="same length"):
        stats.paired_bootstrap_ci([1, 0], [1])
    with pytest.raises(ValueError, match="booleans"):
        stats.mcnemar_exact([2, 0], [1, 0])
    with pytest.raises(ValueError, match="no paired"):
        stats.mcnemar_exact([], [])
    with pytest.raises(ValueError, match="groups has 1"):
        stats.paired_bootstrap_ci([1, 0], [0, 1], groups=["x"])


@pytest.mark.parametrize("ci, p, alpha, expected", [
    ((0.01, 0.05), 0.01, 0.05, "better"),
    ((-0.05, -0.01), 0.01, 0.05, "worse"),
    ((0.01, 0.05), 0.20, 0.05, "not distinguishable at 95 %"),  # CI excludes 0, McNemar does not
    ((-0.01, 0.05), 0.001, 0.05, "not distinguishable at 95 %"),  # McNemar does, CI does not
    ((0.0, 0.05), 0.001, 0.05, "not distinguishable at 95 %"),  # a CI touching 0 does not exclude it
    ((0.01, 0.05), 0.02, 0.01, "not distinguishable at 99 %"),
])
def test_verdict(ci, p, alpha, expected):
    assert stats.verdict(ci, p, alpha) == expected


def test_fit_temperature_minimises_validation_nll():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (400, 5))
    # Labels drawn from softmax(logits / 2.5): the logits are over-confident by a factor 2.5.
    probs = stats.scaled_probabilities(logits, 2.5)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    t = stats.fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.01), np.log(100), 4001))
    nll = np.array([stats.negative_log_likelihood(logits, labels, g) for g in grid])
    assert stats.negative_log_likelihood(logits, labels, t) <= nll.min() + 1e-9
    assert abs(math.log(t) - math.log(grid[nll.argmin()])) < 2 * np.diff(np.log(grid))[0]
    assert 1.8 < t < 3.5  # and it recovers the over-confidence
    assert t == stats.fit_temperature(logits, labels)


def test_fit_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="class indices"):
        stats.fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        stats.fit_temperature(np.zeros(3), np.array([0, 1, 2]))


def test_expected_calibration_error_hand_example():
    # Confidences 0.9 (right), 0.9 (wrong), 0.65 (right), 0.62 (right); 15 bins of width 1/15:
    # 0.9 falls in (13/15, 14/15] with accuracy 1/2, confidence 0.9: gap 0.4, weight 2/4;
    # 0.65 and 0.62 in (9/15, 10/15] with accuracy 1, confidence 0.635: gap 0.365, weight 2/4.
    # ECE = 0.5 * 0.4 + 0.5 * 0.365 = 0.3825.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.35, 0.65], [0.62, 0.38]])
    labels = np.array([0, 1, 1, 0])
    assert stats.expected_calibration_error(probs, labels) == pytest.approx(0.3825)
    # One bin: |accuracy 3/4 - mean confidence 0.7675|.
    assert stats.expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(0.75 - 0.7675))
    # Confidence 0.8 on five samples, four right: calibrated.
    calibrated = np.array([[0.8, 0.2]] * 5)
    assert stats.expected_calibration_error(calibrated, np.array([0, 0, 0, 0, 1])) == pytest.approx(0.0)


def test_compare_runs_pools_seeds():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    right = labels.copy()
    wrong = (labels + 1) % 3
    # Seed 1: headline right on all 10, other right on the first 4. Seed 2: both right on 5.
    head = [(labels, right), (labels, np.where(np.arange(10) < 5, right, wrong))]
    other = [(labels, np.where(np.arange(10) < 4, right, wrong)), (labels, np.where(np.arange(10) < 5, right, wrong))]
    result = stats.compare_runs(head, {"LaFTer": other}, n_boot=2000)["LaFTer"]
    # Pooled: 15/20 vs 9/20 right, 6 pairs only the headline got right, none the other way:
    # p = 2 * (1/2)^6 = 1/32.
    assert result.difference.mean == pytest.approx(6 / 20)
    assert result.p_value == pytest.approx(1 / 32)
    assert result.verdict == "better" and result.difference.low > 0
    assert result.headline_accuracy == pytest.approx((0.75, math.sqrt(0.125)))
    assert result.other_accuracy == pytest.approx((0.45, math.sqrt(0.005)))
    assert result.test_sizes == (10, 10) and result.bootstrap_units == 20
    with pytest.raises(ValueError, match="1 seeds"):
        stats.compare_runs(head, {"x": other[:1]})
    with pytest.raises(ValueError, match="not aligned"):
        stats.compare_runs(head, {"x": [(labels[::-1], right), other[1]]})


def test_holm_adjusts_by_rank_keeps_order_and_caps_at_one():
    from hclafter.core.stats import holm

    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([]) == [] and holm([0.2]) == [0.2]


def test_holm_correction_turns_a_lone_significant_verdict_into_not_distinguishable():
    from hclafter.reporting.evidence import holm_correct

    family = [{"p_value": 0.02, "ci": [0.01, 0.05], "verdict": "better"},
              {"p_value": 0.001, "ci": [-0.09, -0.02], "verdict": "worse"},
              {"p_value": 0.3, "ci": [-0.01, 0.03], "verdict": "not distinguishable at 95 %"}]
    holm_correct(family)
    assert [c["p_holm"] for c in family] == pytest.approx([0.04, 0.003, 0.3])
    assert [c["verdict"] for c in family] == ["better", "worse", "not distinguishable at 95 %"]
    family = [{"p_value": 0.03, "ci": [0.01, 0.05], "verdict": "better"},
              {"p_value": 0.04, "ci": [0.01, 0.05], "verdict": "better"}]
    holm_correct(family)  # 0.03·2 = 0.06: no longer below 0.05
    assert [c["verdict"] for c in family] == ["not distinguishable at 95 %"] * 2
