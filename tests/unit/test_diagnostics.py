"""mlip_uq.inference.diagnostics: ESS and split-R̂ against chains whose answers are known in closed form."""

import numpy as np
import pytest
from scipy.signal import lfilter

from mlip_uq.inference.diagnostics import effective_sample_size, split_rhat, trace_drift


def ar1(phi: float, shape, rng, burn: int = 500) -> np.ndarray:
    """Stationary AR(1) chains x_t = φ x_{t-1} + sqrt(1 - φ²) e_t along axis 1 of ``shape`` (unit variance)."""
    n_chains, n_draws, *rest = shape
    e = rng.normal(size=(n_chains, n_draws + burn, *rest))
    return lfilter([np.sqrt(1 - phi**2)], [1.0, -phi], e, axis=1)[:, burn:]


def ess_reference(x: np.ndarray) -> float:
    """Direct (loop, no FFT) transcription of the estimator of Vehtari et al. (2021) for one coordinate."""
    m, n = x.shape
    means = x.mean(axis=1)
    acov = np.array([[np.sum((c[: n - t] - c.mean()) * (c[t:] - c.mean())) / n for t in range(n)] for c in x])
    w = np.mean(acov[:, 0] * n / (n - 1))
    var_plus = (n - 1) / n * w + (np.var(means, ddof=1) if m > 1 else 0.0)
    rho = 1 - (w - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    total, previous = 0.0, np.inf
    for k in range(n // 2):
        pair = rho[2 * k] + rho[2 * k + 1]
        if pair <= 0:
            break
        previous = min(previous, pair)
        total += previous
    tau = max(-1 + 2 * total, 1 / np.log10(m * n))
    return m * n / tau


def test_matches_direct_reference():
    """FFT autocovariance and the vectorised Geyer truncation equal a plain loop implementation."""
    rng = np.random.default_rng(0)
    x = ar1(0.7, (3, 157, 4), rng) + np.array([0.0, 0.1, -0.2, 0.05])  # odd length, shifted means
    ess = effective_sample_size(x)
    assert ess.shape == (4,)
    for k in range(4):
        assert ess[k] == pytest.approx(ess_reference(x[:, :, k]), rel=1e-10)
    # one chain, as (n,) or (1, n)
    assert effective_sample_size(x[0, :, 0]) == pytest.approx(ess_reference(x[:1, :, 0]), rel=1e-10)
    assert effective_sample_size(x[:1, :, 0]) == pytest.approx(ess_reference(x[:1, :, 0]), rel=1e-10)


@pytest.mark.parametrize("phi", [0.9, 0.5])
def test_ess_ar1(phi):
    """AR(1): integrated autocorrelation time (1 + φ) / (1 - φ), so ESS = n (1 - φ) / (1 + φ), within 15 %."""
    rng = np.random.default_rng(1)
    x = ar1(phi, (4, 20_000, 16), rng)
    expected = x.shape[0] * x.shape[1] * (1 - phi) / (1 + phi)
    ess = effective_sample_size(x)
    assert ess.shape == (16,)
    np.testing.assert_array_less(np.abs(ess / expected - 1), 0.15)
    assert abs(ess.mean() / expected - 1) < 0.05  # the 16 coordinates together


def test_ess_ar1_one_chain():
    rng = np.random.default_rng(2)
    x = ar1(0.9, (1, 40_000, 8), rng)
    expected = 40_000 * 0.1 / 1.9
    np.testing.assert_array_less(np.abs(effective_sample_size(x) / expected - 1), 0.15)


def test_ess_iid_and_trailing_shape():
    """Independent draws: ESS ≈ number of draws within 10 %; the result has the trailing shape."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 5_000, 3, 5))
    ess = effective_sample_size(x)
    assert ess.shape == (3, 5)
    np.testing.assert_array_less(np.abs(ess / 20_000 - 1), 0.10)


def test_ess_antithetic_exceeds_draws():
    """φ = -0.5: ESS = 3 n > n (not capped, the cap is n log10 n)."""
    rng = np.random.default_rng(4)
    x = ar1(-0.5, (2, 20_000, 8), rng)
    np.testing.assert_array_less(np.abs(effective_sample_size(x) / (3 * 40_000) - 1), 0.15)


def test_ess_penalises_disagreeing_chains():
    """Chains that sample different places have a much smaller ESS than the same chains recentred."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 2_000))
    shifted = x + np.array([[-1.0], [0.0], [1.0], [2.0]])
    assert effective_sample_size(shifted) < 0.1 * effective_sample_size(x)


def test_constant_draws_give_nan():
    x = np.ones((2, 100, 2))
    x[..., 1] = np.random.default_rng(6).normal(size=(2, 100))
    ess, rhat = effective_sample_size(x), split_rhat(x)
    assert np.isnan(ess[0]) and np.isfinite(ess[1])
    assert np.isnan(rhat[0]) and np.isfinite(rhat[1])


def test_too_few_draws():
    with pytest.raises(ValueError, match="4 draws"):
        effective_sample_size(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="4 draws"):
        split_rhat(np.zeros((2, 3)))


def test_rhat_well_mixed():
    """Chains from the same law, independent or AR(1), give R̂ < 1.01."""
    rng = np.random.default_rng(7)
    rhat = split_rhat(rng.normal(size=(4, 2_000, 10)))
    assert rhat.shape == (10,)
    np.testing.assert_array_less(rhat, 1.01)
    np.testing.assert_array_less(0.99, rhat)
    np.testing.assert_array_less(split_rhat(ar1(0.9, (4, 20_000, 10), rng)), 1.01)


def test_rhat_different_means():
    """Chains whose means differ by one standard deviation: R̂ clearly above 1.1."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 2_000, 5)) + np.arange(4.0)[:, None, None]
    np.testing.assert_array_less(1.1, split_rhat(x))


def test_rhat_split_detects_drift_in_one_chain():
    """A single chain whose second half sits elsewhere: only the split makes R̂ see it."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=2_001)
    x[1_000:] += 1.5
    assert split_rhat(x) > 1.1
    assert split_rhat(rng.normal(size=2_001)) < 1.01


def test_rhat_closed_form():
    """Tiny example computed by hand: two chains [0, 1, 2, 3] and [1, 2, 3, 4]."""
    x = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    # halves [0,1], [2,3], [1,2], [3,4]: W = 0.5, half-chain means 0.5, 2.5, 1.5, 3.5 -> B/n = var(ddof=1) = 5/3
    w, b_over_n = 0.5, 5.0 / 3.0
    expected = np.sqrt((0.5 * w + b_over_n) / w)
    assert split_rhat(x) == pytest.approx(expected, rel=1e-12)


def test_trace_drift_tells_a_plateau_from_a_trend():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=500)
    plateau = np.r_[np.linspace(50.0, 10.0, 250), np.full(250, 10.0)] + noise
    assert trace_drift(plateau)["flat"]
    trend = np.linspace(50.0, 10.0, 500) + noise
    report = trace_drift(trend)
    assert not report["flat"] and report["change"] < -3 * report["standard_error"]
    assert report["change"] == pytest.approx(-40.0 / 499 * 100, abs=0.5)  # windows 100 rows apart
    # a resolved but negligible trend (1e-4 relative over a window) counts as flat
    tiny = 1000.0 + np.linspace(0.0, -0.5, 500) + 0.01 * noise
    assert not trace_drift(tiny, relative_tolerance=0.0)["flat"] and trace_drift(tiny)["flat"]
    with pytest.raises(ValueError, match="2 rows per window"):
        trace_drift(np.ones(5))
