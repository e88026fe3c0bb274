"""mlip_uq.uq.metrics: calibration, scoring, ranking and the metrics.json table, against analytic values."""

import json
import math

import numpy as np
import pytest

from mlip_uq.uq import (
    METRIC_DEFINITIONS,
    auroc,
    binned_rmse_rmv,
    coverage_curve,
    evaluation_metrics,
    fit_std_scale,
    gaussian_nll,
    miscalibration_area,
    regression_metrics,
    rms_calibration_error,
    sharpness,
    spearman,
)

N_BIG = 200_000

# docs/design.md "Metric names", plus the AUROC threshold that must be stated in the file
DESIGN_KEYS = {
    "energy_mae", "energy_rmse", "forces_mae", "forces_rmse",
    "energy_nll", "forces_nll", "energy_miscal_area", "forces_miscal_area",
    "energy_rms_cal", "forces_rms_cal", "energy_spearman", "forces_spearman",
    "forces_auroc", "energy_sharpness", "forces_sharpness", "n_structures", "n_samples",
    "forces_auroc_threshold", "energy_n_degenerate", "forces_n_degenerate",
}
ACCURACY_KEYS = {"energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "n_structures", "n_samples"}


@pytest.fixture(scope="module")
def gaussian_draw():
    """Errors drawn from N(0, σ²) with heteroscedastic σ (log-normal, spanning ~2 decades)."""
    rng = np.random.default_rng(12345)
    std = np.exp(rng.normal(-2.0, 0.8, N_BIG))
    error = rng.normal(size=N_BIG) * std
    return error, std


# ------------------------------------------------------------------------------------------ calibration
def test_calibrated_errors_have_small_area_and_analytic_nll(gaussian_draw):
    error, std = gaussian_draw
    assert miscalibration_area(error, std) < 0.01
    assert rms_calibration_error(error, std) < 0.01
    # E[NLL] = 0.5 log(2π) + E[log σ] + 0.5 E[z²] with z ~ N(0, 1)
    expected_nll = 0.5 * math.log(2 * math.pi) + np.mean(np.log(std)) + 0.5
    assert gaussian_nll(error, std) == pytest.approx(expected_nll, abs=0.01)


def test_underestimated_std_is_miscalibrated(gaussian_draw):
    error, std = gaussian_draw
    area = miscalibration_area(error, std / 2.0)
    assert area > 0.1
    # over-confident: observed coverage below expected at every interior level
    expected, observed = coverage_curve(error, std / 2.0)
    assert np.all(observed < expected)
    # and the NLL is worse than with the true std
    assert gaussian_nll(error, std / 2.0) > gaussian_nll(error, std) + 0.5


def test_coverage_curve_matches_analytic_law_for_scaled_std(gaussian_draw):
    # with std scaled by 1/c, |e|/σ' = c|z|: observed(p) = 2Φ(Φ⁻¹(0.5+p/2)/c) - 1
    from scipy.stats import norm

    error, std = gaussian_draw
    c = 2.0
    expected, observed = coverage_curve(error, std / c)
    analytic = 2 * norm.cdf(norm.ppf(0.5 + expected / 2) / c) - 1
    assert np.max(np.abs(observed - analytic)) < 0.005
    assert expected.shape == (99,)
    assert expected[0] == pytest.approx(0.01) and expected[-1] == pytest.approx(0.99)


def test_miscalibration_area_is_exact_integral_of_polyline():
    # every |z| = 0: the interval at p = 0 is [0, 0] and still holds them, so observed = 1 at every level;
    # the polyline of 1 - p integrates to exactly 0.5
    error, std = np.zeros(10), np.ones(10)
    assert miscalibration_area(error, std) == pytest.approx(0.5, abs=1e-12)
    # every |z| huge: observed = 0 except at p = 1 (infinite interval), so d = obs - p is -p with d(1) = 0
    error = np.full(10, 1e6)
    levels = np.linspace(0, 1, 100)
    d = -levels
    d[-1] = 0.0
    manual = sum(0.5 * (levels[i + 1] - levels[i]) * abs(d[i] + d[i + 1]) for i in range(99))
    assert miscalibration_area(error, std) == pytest.approx(manual, abs=1e-12)


def test_calibration_inputs_are_validated():
    with pytest.raises(ValueError, match="positive"):
        gaussian_nll([0.1, 0.2], [1.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        miscalibration_area(np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        rms_calibration_error([np.nan, 0.0], [1.0, 1.0])


# ----------------------------------------------------------------------------------------- recalibration
def test_fit_std_scale_recovers_factor_and_minimises_nll(gaussian_draw):
    _, std = gaussian_draw
    rng = np.random.default_rng(7)
    error = 3.0 * std * rng.normal(size=std.size)  # errors drawn at 3σ
    s = fit_std_scale(error, std)
    assert s == pytest.approx(3.0, rel=0.01)
    nll_at = gaussian_nll(error, s * std)
    assert nll_at < gaussian_nll(error, 0.9 * s * std)
    assert nll_at < gaussian_nll(error, 1.1 * s * std)
    # the fitted std is calibrated
    assert miscalibration_area(error, s * std) < 0.01
    # closed form: derivative of the mean NLL in s vanishes there (finite difference)
    h = 1e-5
    slope = (gaussian_nll(error, (s + h) * std) - gaussian_nll(error, (s - h) * std)) / (2 * h)
    assert abs(slope) < 1e-6


# -------------------------------------------------------------------------------------------- ranking
def test_auroc_hand_cases():
    std = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    abs_err = np.array([0.0, 0.1, 0.2, 1.0, 2.0, 3.0])
    assert auroc(std, abs_err, threshold=0.5) == 1.0  # perfect detector
    assert auroc(std[::-1], abs_err, threshold=0.5) == 0.0  # inverted
    # hand count: positives {0.4, 0.1}, negatives {0.2, 0.3, 0.05}: pairs won 0.4>all 3, 0.1>0.05 -> 4/6
    assert auroc([0.4, 0.1, 0.2, 0.3, 0.05], [1, 1, 0, 0, 0], threshold=0.5) == pytest.approx(4 / 6)
    # ties count one half: constant std -> 0.5 exactly
    assert auroc(np.ones(6), abs_err, threshold=0.5) == 0.5
    # one tie across classes: pos {0.3}, neg {0.3, 0.1} -> (0.5 + 1) / 2
    assert auroc([0.3, 0.3, 0.1], [1, 0, 0], threshold=0.5) == pytest.approx(0.75)
    # only one class -> nan; threshold is strict (> threshold)
    assert math.isnan(auroc(std, abs_err, threshold=10.0))
    assert auroc([0.1, 0.2, 0.3], [0.5, 0.5, 1.0], threshold=0.5) == 1.0  # |e| = threshold is negative


def test_auroc_random_is_half_and_matches_pair_count():
    rng = np.random.default_rng(3)
    std, err = rng.random(20_000), rng.random(20_000)
    assert auroc(std, err, threshold=0.7) == pytest.approx(0.5, abs=0.02)
    # brute-force pair count on a small sample with ties
    s = np.round(rng.random(60), 1)
    e = rng.random(60)
    pos, neg = s[e > 0.5], s[e <= 0.5]
    brute = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert auroc(s, e, threshold=0.5) == pytest.approx(brute, abs=1e-12)


def test_spearman_hand_cases():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    # hand-computed: ranks (1..5) vs (2,1,4,3,5): d² = 1+1+1+1+0 = 4 -> 1 - 6·4/(5·24) = 0.8
    assert spearman(x, [0.2, 0.1, 0.4, 0.3, 0.5]) == pytest.approx(0.8)
    rng = np.random.default_rng(11)
    assert abs(spearman(rng.random(20_000), rng.random(20_000))) < 0.03
    # constant input -> nan, documented
    assert math.isnan(spearman(np.ones(5), x))
    assert math.isnan(spearman(x, np.zeros(5)))
    # one std per atom for every structure, as a single model's learned energy noise: total / n_atoms in
    # float32 differs by round-off between structure sizes, which must not rank them
    n_atoms = np.array([6, 24, 47, 95, 6, 24], dtype=np.float32)
    per_atom = (np.float32(0.0071) * n_atoms) / n_atoms
    assert np.ptp(per_atom) > 0 and math.isnan(spearman(per_atom, np.arange(6.0)))
    assert spearman(1.0 + 1e-4 * x, x) == pytest.approx(1.0)  # a real spread of 0.04 % is still ranked
    assert "nan" in spearman.__doc__


def test_sharpness_is_mean_std_and_documented_as_such():
    std = np.array([0.1, 0.2, 0.6])
    assert sharpness(std) == pytest.approx(0.3)
    assert sharpness(std) != pytest.approx(np.sqrt(np.mean(std**2)))  # not UT's RMS
    assert "mean predicted std" in sharpness.__doc__.lower()
    assert "sqrt(mean(σ²))" in sharpness.__doc__


def test_binned_rmse_rmv_on_calibrated_data(gaussian_draw):
    error, std = gaussian_draw
    rmv, rmse, counts = binned_rmse_rmv(np.abs(error), std, n_bins=10)
    assert counts.sum() == error.size and len(counts) == 10
    assert np.all(np.diff(rmv) > 0)
    np.testing.assert_allclose(rmse, rmv, rtol=0.03)
    _, rmse_bad, _ = binned_rmse_rmv(np.abs(error), std / 2, n_bins=10)
    np.testing.assert_allclose(rmse_bad, rmse)  # errors unchanged; only rmv halves


# ------------------------------------------------------------------------------------------ metrics dict
def test_regression_metrics_keys_and_values():
    pred = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, -1.0]])
    out = regression_metrics(pred, target, prefix="forces")
    assert out == {"forces_mae": pytest.approx(4 / 6), "forces_rmse": pytest.approx(math.sqrt(6 / 6))}
    std = np.full(pred.shape, 0.5)
    out = regression_metrics(pred, target, std, prefix="x", auroc_threshold=0.5)
    assert set(out) == {f"x_{k}" for k in
                        ("mae", "rmse", "nll", "miscal_area", "rms_cal", "spearman", "sharpness", "auroc",
                         "n_degenerate")}
    assert out.pop("x_n_degenerate") == 0 and all(type(v) is float for v in out.values())
    assert out["x_sharpness"] == 0.5
    assert out["x_nll"] == pytest.approx(gaussian_nll(pred - target, std))
    assert "x_auroc" not in regression_metrics(pred, target, std, prefix="x")


def test_components_without_uncertainty_information_are_left_out_of_the_uncertainty_metrics():
    # a force component zero by symmetry in every sample: σ ~ 1e-16, reference off zero by the DFT noise
    rng = np.random.default_rng(0)
    std = rng.uniform(0.05, 0.2, 200)
    err = rng.normal(0.0, std)
    out = regression_metrics(err, np.zeros(200), std, prefix="f")
    degenerate = regression_metrics(np.append(err, 1e-6), np.zeros(201), np.append(std, 1e-16), prefix="f")
    assert degenerate["f_n_degenerate"] == 1 and out["f_n_degenerate"] == 0
    for key in ("f_nll", "f_miscal_area", "f_sharpness", "f_spearman"):
        assert degenerate[key] == pytest.approx(out[key])
    assert degenerate["f_mae"] != out["f_mae"]  # accuracy still counts every component


def _synthetic_eval(seed=0, n_struct=40, n_atoms=300):
    rng = np.random.default_rng(seed)
    e_std = rng.uniform(0.002, 0.02, n_struct)
    e_true = rng.normal(-5.0, 0.1, n_struct)
    e_pred = e_true + e_std * rng.normal(size=n_struct)
    f_std = rng.uniform(0.02, 0.3, (n_atoms, 3))
    f_true = rng.normal(0.0, 1.0, (n_atoms, 3))
    f_pred = f_true + f_std * rng.normal(size=(n_atoms, 3))
    return e_pred, e_true, e_std, f_pred, f_true, f_std


def test_evaluation_metrics_has_exactly_design_keys():
    e_pred, e_true, e_std, f_pred, f_true, f_std = _synthetic_eval()
    out = evaluation_metrics(e_pred, e_true, e_std, f_pred, f_true, f_std, n_samples=8)
    assert set(out) == DESIGN_KEYS
    assert set(METRIC_DEFINITIONS) == DESIGN_KEYS  # every key has a written definition
    for key, value in out.items():
        assert type(value) is (int if key in ("n_structures", "n_samples") or "n_degenerate" in key else float), key
        assert math.isfinite(value), key
    assert out["n_structures"] == 40 and out["n_samples"] == 8
    # forces are scored per Cartesian component
    assert out["forces_mae"] == pytest.approx(np.mean(np.abs(f_pred - f_true)))
    assert out["energy_rmse"] == pytest.approx(np.sqrt(np.mean((e_pred - e_true) ** 2)))
    # default threshold rule: 2 x forces MAE, written into the dict
    assert out["forces_auroc_threshold"] == pytest.approx(2 * out["forces_mae"])
    assert out["forces_auroc"] == pytest.approx(
        auroc(f_std, np.abs(f_pred - f_true), out["forces_auroc_threshold"]))
    assert out["forces_auroc"] > 0.7  # errors drawn with their std: std detects the large ones
    assert out["forces_spearman"] > 0.3
    json.dumps(out, allow_nan=False)  # JSON-ready

    given = evaluation_metrics(e_pred, e_true, e_std, f_pred, f_true, f_std, 8, forces_auroc_threshold=0.1)
    assert given["forces_auroc_threshold"] == 0.1


def test_evaluation_metrics_without_std_has_accuracy_keys_only():
    e_pred, e_true, _, f_pred, f_true, _ = _synthetic_eval()
    out = evaluation_metrics(e_pred, e_true, None, f_pred, f_true, None, n_samples=1)
    assert set(out) == ACCURACY_KEYS
    assert all(math.isfinite(v) for v in out.values())
    assert out["n_samples"] == 1


def test_evaluation_metrics_rejects_bad_shapes():
    e_pred, e_true, e_std, f_pred, f_true, f_std = _synthetic_eval()
    with pytest.raises(ValueError, match="n_atoms, 3"):
        evaluation_metrics(e_pred, e_true, e_std, f_pred.reshape(-1), f_true.reshape(-1), None, 1)
    with pytest.raises(ValueError, match="shape"):
        evaluation_metrics(e_pred, e_true[:-1], None, f_pred, f_true, None, 1)
    with pytest.raises(ValueError, match="shape"):
        evaluation_metrics(e_pred, e_true, e_std, f_pred, f_true, f_std[:-1], 1)
    with pytest.raises(ValueError, match="n_samples"):
        evaluation_metrics(e_pred, e_true, e_std, f_pred, f_true, f_std, 0)
