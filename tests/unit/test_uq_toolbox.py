"""Cross-check mlip_uq.uq.metrics against Uncertainty Toolbox 0.1.1 (a test dependency).

UT's calibration metrics are evaluated on the same 100-level grid with the same closed intervals, so the
values agree to floating-point rounding; the tolerance used is 1e-10 (UT sums per-segment trapezoids in a
different order). Convention: our ``error = pred - target``; UT takes ``(y_pred, y_std, y_true)``.
"""

import numpy as np
import pytest
import uncertainty_toolbox as uct

from mlip_uq.uq import (
    gaussian_nll,
    mean_absolute_calibration_error,
    miscalibration_area,
    rms_calibration_error,
    sharpness,
)

TOL = 1e-10


def _cases():
    rng = np.random.default_rng(2024)
    out = []
    for n, factor in [(7, 1.0), (50, 0.4), (1000, 1.0), (1000, 1.7), (5000, 0.8), (3000, 3.0)]:
        std = np.exp(rng.normal(-1.0, 0.7, n))
        target = rng.normal(0.0, 2.0, n)
        pred = target + factor * std * rng.normal(size=n)
        out.append((pred, std, target))
    return out


@pytest.mark.parametrize("case", range(6))
def test_calibration_metrics_match_uncertainty_toolbox(case):
    pred, std, target = _cases()[case]
    err = pred - target
    mc = uct.metrics_calibration
    assert miscalibration_area(err, std) == pytest.approx(
        mc.miscalibration_area(pred, std, target, vectorized=True), abs=TOL)
    assert rms_calibration_error(err, std) == pytest.approx(
        mc.root_mean_squared_calibration_error(pred, std, target, vectorized=True), abs=TOL)
    assert mean_absolute_calibration_error(err, std) == pytest.approx(
        mc.mean_absolute_calibration_error(pred, std, target, vectorized=True), abs=TOL)


def test_non_vectorised_toolbox_path_agrees_too():
    pred, std, target = _cases()[1]
    mc = uct.metrics_calibration
    assert miscalibration_area(pred - target, std) == pytest.approx(
        mc.miscalibration_area(pred, std, target, vectorized=False), abs=TOL)
    assert rms_calibration_error(pred - target, std) == pytest.approx(
        mc.root_mean_squared_calibration_error(pred, std, target, vectorized=False), abs=TOL)


@pytest.mark.parametrize("case", range(6))
def test_nll_matches_toolbox_mean_positive_nll(case):
    # uct.nll_gaussian = -sum(logpdf) / n with scaled=True: a positive mean, same as ours
    pred, std, target = _cases()[case]
    ours = gaussian_nll(pred - target, std)
    assert ours == pytest.approx(uct.metrics_scoring_rule.nll_gaussian(pred, std, target), abs=TOL)
    assert ours * len(std) == pytest.approx(
        uct.metrics_scoring_rule.nll_gaussian(pred, std, target, scaled=False), rel=1e-12)


def test_sharpness_differs_from_toolbox_as_documented():
    # docs/design.md: sharpness = mean predicted std; UT: sqrt(mean σ²). Test each against its own formula.
    _, std, _ = _cases()[4]
    assert sharpness(std) == pytest.approx(np.mean(std), rel=1e-14)
    assert uct.metrics_calibration.sharpness(std) == pytest.approx(np.sqrt(np.mean(std**2)), rel=1e-14)
    assert sharpness(std) < uct.metrics_calibration.sharpness(std)  # Jensen, strict for non-constant σ
    const = np.full(10, 0.3)
    assert sharpness(const) == pytest.approx(uct.metrics_calibration.sharpness(const), rel=1e-14)
    assert "Uncertainty Toolbox" in sharpness.__doc__ and "sqrt(mean(σ²))" in sharpness.__doc__
