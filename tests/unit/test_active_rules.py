"""Selection rules: thresholds, top-k, random and fixed-interval baselines, and the calibrated rule on a synthetic Gaussian case."""

import numpy as np
import pytest
from scipy import stats

from mlip_uq.active.rules import (
    CalibratedRule,
    IntervalRule,
    RandomRule,
    ThresholdRule,
    TopKRule,
    rule_from_config,
)
from mlip_uq.config import ConfigError


def _pool(rng, n=20, atoms=5):
    stds = [rng.uniform(0.01, 0.5, atoms) for _ in range(n)]
    forces = [rng.normal(0, 1, (atoms, 3)) for _ in range(n)]
    return stds, forces


def test_threshold_rule_selects_the_candidates_above_it_most_uncertain_first():
    rng = np.random.default_rng(0)
    stds, forces = _pool(rng)
    picked = ThresholdRule(0.4).select(stds, forces, k=100)
    expected = [i for i in range(20) if stds[i].max() > 0.4]
    assert sorted(picked) == expected and len(expected) > 2
    assert [stds[i].max() for i in picked] == sorted((stds[i].max() for i in picked), reverse=True)
    assert len(ThresholdRule(0.4).select(stds, forces, k=2)) == 2


def test_threshold_rule_is_the_md_rule():
    rule = ThresholdRule(0.3, consecutive=2)
    low, high = np.array([0.1, 0.2]), np.array([0.1, 0.5])
    forces = np.ones((2, 3))
    assert rule.check(high, forces) and not rule.check(low, forces)
    assert rule.consecutive == 2 and "0.3" in rule.describe()  # run_md counts the consecutive steps
    relative = ThresholdRule(0.5, relative=True)
    small, large = np.zeros((2, 3)), np.full((2, 3), 10.0)
    assert relative.check(np.array([0.1, 0.2]), small) and not relative.check(np.array([0.1, 0.2]), large)


def test_top_k_and_random():
    rng = np.random.default_rng(1)
    stds, forces = _pool(rng)
    top = TopKRule().select(stds, forces, k=3)
    assert top == list(np.argsort([-s.max() for s in stds])[:3])
    with pytest.raises(NotImplementedError, match="pool only"):
        TopKRule().check(stds[0], forces[0])
    first, second = RandomRule(seed=3), RandomRule(seed=3)
    assert first.select(stds, forces, 4) == second.select(stds, forces, 4)
    assert len(set(first.select(stds, forces, 20))) == 20


def test_random_rule_fires_at_its_rate_and_its_state_round_trips():
    rule = RandomRule(probability=0.1, seed=0)
    fires = [rule.check(None, None) for _ in range(20000)]
    assert np.mean(fires) == pytest.approx(0.1, abs=0.01)
    state = rule.state_dict()
    after = [rule.check(None, None) for _ in range(50)]
    other = RandomRule(probability=0.1, seed=99)
    other.load_state_dict(state)
    assert [other.check(None, None) for _ in range(50)] == after


def test_interval_rule_is_due_at_every_nth_walker_step_only():
    rule = rule_from_config({"kind": "interval", "every": 25})
    assert isinstance(rule, IntervalRule) and rule.check(None, None)  # fires at every check it is due
    assert [step for step in range(0, 101) if rule.due(step)] == [25, 50, 75, 100]
    assert RandomRule(probability=0.5).due(7)  # the other rules may call at any step
    for every in (0, -5, 2.5, True):
        with pytest.raises(ConfigError, match="rule.every"):
            IntervalRule(every)


def _synthetic(rng, n_atoms, true_scale):
    """Per-atom stds σ_i and isotropic Gaussian errors with component std true_scale·σ_i/√3."""
    sigma = rng.lognormal(np.log(0.1), 0.5, n_atoms)
    error = rng.normal(0.0, 1.0, (n_atoms, 3)) * (true_scale * sigma / np.sqrt(3))[:, None]
    return sigma, error


def _check_probability(rule, sigma, error, tolerance, tol):
    predicted = rule.exceed_probability(sigma)
    observed = np.linalg.norm(error, axis=1) > tolerance
    assert 0.1 < observed.mean() < 0.9  # a case where the test can fail
    assert predicted.mean() == pytest.approx(observed.mean(), abs=tol)
    # and bin by bin (reliability): atoms predicted at p exceed the tolerance with frequency ≈ p
    bins = np.digitize(predicted, [0.2, 0.4, 0.6, 0.8])
    for b in range(5):
        chosen = bins == b
        assert chosen.sum() > 1000
        assert observed[chosen].mean() == pytest.approx(predicted[chosen].mean(), abs=2 * tol)


def test_calibrated_rule_probability_matches_the_observed_fraction_on_a_known_gaussian():
    rng = np.random.default_rng(0)
    true_scale, tolerance = 2.5, 0.3
    sigma, error = _synthetic(rng, 400_000, true_scale)
    # the scale known exactly: the probabilities are those of the generating distribution
    _check_probability(CalibratedRule(tolerance, prior_scale=true_scale, prior_weight=0), sigma, error, tolerance,
                       0.003)
    # the uncalibrated std (scale 1) gives clearly wrong probabilities
    assert CalibratedRule(tolerance).exceed_probability(sigma).mean() < np.mean(
        np.linalg.norm(error, axis=1) > tolerance) - 0.1


def test_calibrated_rule_learns_the_scale_from_reference_residuals():
    rng = np.random.default_rng(1)
    true_scale, tolerance = 2.5, 0.3
    rule = CalibratedRule(tolerance=tolerance, probability=0.5, prior_scale=1.0, prior_weight=10)
    assert rule.scale == 1.0
    for _ in range(200):  # 200 "reference calls" of 50 atoms each
        sigma, error = _synthetic(rng, 50, true_scale)
        pred = rng.normal(0, 1, (50, 3))
        rule.observe(pred, pred - error, sigma)
    # 10,000 atoms: the relative standard error of the scale is about sqrt(1/6)/sqrt(10^4) = 0.4 %
    assert rule.scale == pytest.approx(true_scale, rel=0.015)
    # the prior from a residual set ("prior_scale: initial") is the same estimator without shrinkage
    initial = CalibratedRule(tolerance)
    assert initial.needs_prior and initial.scale == 1.0
    sigma, error = _synthetic(rng, 10_000, true_scale)
    initial.set_prior(np.zeros((10_000, 3)), error, sigma)
    assert not initial.needs_prior and initial.scale == pytest.approx(true_scale, rel=0.015)
    sigma, error = _synthetic(rng, 400_000, true_scale)
    _check_probability(rule, sigma, error, tolerance, 0.01)


def test_calibrated_rule_probability_formula_and_firing():
    rule = CalibratedRule(tolerance=0.2, probability=0.5, prior_weight=0)
    sigma = np.array([0.05, 0.2, 0.4])
    expected = stats.chi(3).sf(np.sqrt(3) * 0.2 / sigma)
    np.testing.assert_allclose(rule.exceed_probability(sigma), expected, rtol=1e-12)
    assert rule.score(sigma, None) == pytest.approx(expected.max())
    assert rule.check(sigma, None) == (expected.max() > 0.5)
    assert rule.exceed_probability(np.array([0.0]))[0] == 0.0
    # an observed error of exactly the predicted size leaves the scale at one
    rule.observe(np.zeros((3, 3)), np.stack([sigma, 0 * sigma, 0 * sigma], axis=1), sigma)
    assert rule.scale == pytest.approx(1.0)
    state = rule.state_dict()
    other = CalibratedRule(tolerance=0.2, prior_weight=0)
    other.load_state_dict(state)
    assert other.scale == rule.scale


def test_rule_from_config_names_bad_input():
    assert isinstance(rule_from_config({"kind": "calibrated", "tolerance": 0.1}), CalibratedRule)
    with pytest.raises(ValueError, match="unknown; choose from"):
        rule_from_config({"kind": "entropy"})
    with pytest.raises(ValueError, match="threshhold"):
        rule_from_config({"kind": "force_std", "threshhold": 0.1})
    with pytest.raises(ValueError, match="tolerance must be positive"):
        rule_from_config({"kind": "calibrated", "tolerance": 0})
    with pytest.raises(ValueError, match="needs rule.probability"):
        RandomRule().check(None, None)
