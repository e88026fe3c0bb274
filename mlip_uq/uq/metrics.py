"""Accuracy and uncertainty-quality metrics (numpy, float64).

Every function takes plain arrays of any shape (they are flattened, so forces of shape (N, 3) are scored per
Cartesian component) and returns a plain Python ``float``, so that results can be written to ``metrics.json``
as they are.

Conventions. ``error = pred - target``; ``std`` is a predictive **standard deviation** in the unit of the
quantity (never a variance). A predictive distribution is read as the centred Gaussian ``N(0, std**2)`` for
the error. Definitions follow Uncertainty Toolbox (UT, Chung et al. 2021, v0.1.1) where it has one; the one
deliberate difference is :func:`sharpness` (mean std here, root-mean-square std in UT), as docs/design.md asks.

==========================  =======================================================  ======================
mlip_uq                     definition                                               Uncertainty Toolbox
==========================  =======================================================  ======================
``gaussian_nll``            mean over items of 0.5 log(2π σ²) + e² / (2σ²)           ``nll_gaussian``
                                                                                     (``scaled=True``)
``miscalibration_area``     ∫₀¹ |obs(p) - p| dp, piecewise linear on 100 levels      ``miscalibration_area``
                            ``linspace(0, 1, 100)``, centred intervals
``rms_calibration_error``   sqrt(mean over the same 100 levels of (obs(p) - p)²)     ``root_mean_squared_
                                                                                     calibration_error``
``mean_absolute_``          mean over the same 100 levels of |obs(p) - p|            ``mean_absolute_
``calibration_error``                                                                calibration_error``
``sharpness``               mean(σ)                                                  differs: UT uses
                                                                                     sqrt(mean(σ²))
==========================  =======================================================  ======================

``obs(p)`` is the fraction of items with ``|e| / σ <= Φ⁻¹(0.5 + p/2)``, i.e. inside the central Gaussian
interval of probability ``p`` (UT's ``prop_type="interval"``).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
from scipy import stats
from scipy.special import ndtri

__all__ = [
    "CALIBRATION_LEVELS",
    "DEFAULT_AUROC_MAE_FACTOR",
    "METRIC_DEFINITIONS",
    "auroc",
    "binned_rmse_rmv",
    "coverage_curve",
    "evaluation_metrics",
    "fit_std_scale",
    "gaussian_nll",
    "mean_absolute_calibration_error",
    "miscalibration_area",
    "regression_metrics",
    "rms_calibration_error",
    "sharpness",
    "spearman",
]

#: Expected-coverage levels of the calibration metrics: Uncertainty Toolbox's default grid
#: (``num_bins=100`` points from 0 to 1, end points included).
CALIBRATION_LEVELS = np.linspace(0.0, 1.0, 100)

#: Factor of the default forces AUROC threshold: errors above ``DEFAULT_AUROC_MAE_FACTOR * forces_mae``
#: count as "large" when :func:`evaluation_metrics` is given no threshold.
DEFAULT_AUROC_MAE_FACTOR = 2.0

#: Predictive stds at or below this fraction of the median std carry no uncertainty information: e.g. a force
#: component that is zero by symmetry for every sample (an atom on an inversion centre) has σ ~ 1e-16 eV/Å while
#: its reference value is off zero by the DFT noise, and one such component would dominate the NLL. The
#: uncertainty metrics and the recalibration fits leave them out and report how many (``{prefix}_n_degenerate``).
#: Relative to the median, so that a scalar recalibration leaves the same items out.
DEGENERATE_STD = 1e-6


def informative(std) -> np.ndarray:
    """Mask of the stds above :data:`DEGENERATE_STD` times their median (same shape as ``std``)."""
    s = np.asarray(std, dtype=np.float64)
    return s > DEGENERATE_STD * np.median(s) if s.size else np.zeros(s.shape, dtype=bool)

#: Every key :func:`evaluation_metrics` may write, with its definition and unit (docs/design.md, "Metric names").
METRIC_DEFINITIONS = {
    "energy_mae": "mean |E_pred - E_true| / n_atoms over structures (eV/atom)",
    "energy_rmse": "sqrt(mean ((E_pred - E_true) / n_atoms)^2) over structures (eV/atom)",
    "forces_mae": "mean |F_pred - F_true| over all Cartesian force components (eV/Å)",
    "forces_rmse": "sqrt(mean (F_pred - F_true)^2) over all Cartesian force components (eV/Å)",
    "energy_nll": "mean Gaussian NLL of the per-atom energy error, 0.5 log(2π σ²) + e²/(2σ²), σ in eV/atom",
    "forces_nll": "mean Gaussian NLL per force component, 0.5 log(2π σ²) + e²/(2σ²), σ in eV/Å",
    "energy_miscal_area": "area between observed and expected coverage of centred Gaussian intervals "
    "(UT miscalibration_area, 100 levels), per-atom energies; 0 = calibrated",
    "forces_miscal_area": "as energy_miscal_area, per force component",
    "energy_rms_cal": "UT root_mean_squared_calibration_error (100 levels), per-atom energies",
    "forces_rms_cal": "UT root_mean_squared_calibration_error (100 levels), per force component",
    "energy_spearman": "Spearman rank correlation of predicted std with |error|, per-atom energies",
    "forces_spearman": "Spearman rank correlation of predicted std with |error|, per force component",
    "energy_n_degenerate": "structures left out of the energy uncertainty metrics: std <= 1e-6 x median std",
    "forces_n_degenerate": "force components left out of the uncertainty metrics: std <= 1e-6 x median std, "
                           "e.g. zero by symmetry in every sample",
    "forces_auroc": "ROC AUC of the force-component std as a detector of |error| > forces_auroc_threshold",
    "forces_auroc_threshold": "error threshold of forces_auroc (eV/Å); default 2 x forces_mae",
    "energy_sharpness": "mean predicted std of the per-atom energy (eV/atom); UT's sharpness is RMS std",
    "forces_sharpness": "mean predicted std per force component (eV/Å); UT's sharpness is RMS std",
    "n_structures": "number of structures evaluated",
    "n_samples": "number of posterior samples K used for the prediction",
}


# ----------------------------------------------------------------------------------------------- helpers
def _flat(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _pair(a, b, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"{name_a} has shape {np.shape(a)} but {name_b} has shape {np.shape(b)}")
    return _flat(a, name_a), _flat(b, name_b)


def _error_std(error, std) -> tuple[np.ndarray, np.ndarray]:
    """Flattened float64 ``error`` and strictly positive ``std`` of the same shape."""
    e, s = _pair(error, std, "error", "std")
    if np.any(s <= 0.0):
        raise ValueError("std must be strictly positive for calibration metrics and the NLL")
    return e, s


def _observed_coverage(z: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Fraction of normalised absolute errors ``z = |e|/σ`` inside each central interval.

    The interval of probability ``p`` is ``[-Φ⁻¹(0.5 + p/2), Φ⁻¹(0.5 + p/2)]`` (closed, as in UT); counted by
    a binary search on the sorted ``z``, so memory stays O(n) for any number of levels.
    """
    half_width = ndtri(0.5 + 0.5 * levels)  # p = 1 -> +inf, every finite z inside
    return np.searchsorted(np.sort(z), half_width, side="right") / z.size


def _abs_area_piecewise_linear(x: np.ndarray, d: np.ndarray) -> float:
    """Exact ∫ |d(x)| dx of the piecewise-linear interpolant of ``d`` on the grid ``x``.

    On a segment where ``d`` keeps its sign the integral is the trapezoid ``Δx |d_l + d_r| / 2``; where it
    changes sign the two triangles on either side of the root give ``Δx (d_l² + d_r²) / (2 (|d_l| + |d_r|))``.
    This is the area between the two curves as Uncertainty Toolbox traces it.
    """
    dl, dr, dx = d[:-1], d[1:], np.diff(x)
    same_sign = dl * dr >= 0.0
    trapezoid = 0.5 * dx * np.abs(dl + dr)
    denom = np.abs(dl) + np.abs(dr)
    with np.errstate(invalid="ignore", divide="ignore"):
        hourglass = 0.5 * dx * (dl * dl + dr * dr) / denom
    return float(np.sum(np.where(same_sign, trapezoid, hourglass)))


# ------------------------------------------------------------------------------------ scoring / calibration
def gaussian_nll(error, std) -> float:
    """Mean negative log-likelihood per item of a centred Gaussian.

    ``mean_i [ 0.5 log(2π σ_i²) + e_i² / (2 σ_i²) ]`` in natural units (the value depends on the unit of σ
    through the log term). Equals Uncertainty Toolbox's ``nll_gaussian(..., scaled=True)`` (positive sign,
    mean not sum).

    Args:
        error: prediction minus target, any shape.
        std: predictive standard deviations, same shape, > 0.

    Returns:
        The mean NLL as a float.

    >>> round(gaussian_nll([0.0], [1.0]), 6)  # 0.5 log(2π)
    0.918939
    """
    e, s = _error_std(error, std)
    return float(np.mean(0.5 * np.log(2.0 * np.pi) + np.log(s) + 0.5 * (e / s) ** 2))


def coverage_curve(error, std, levels=np.linspace(0.01, 0.99, 99)) -> tuple[np.ndarray, np.ndarray]:
    """Expected vs observed coverage of centred Gaussian intervals.

    For each expected probability ``p`` in ``levels`` the observed coverage is the fraction of items with
    ``|e| <= Φ⁻¹(0.5 + p/2) σ``. A calibrated model gives ``observed ≈ expected``; observed below expected
    means over-confidence (std too small).

    Note the default grid (0.01..0.99) is for display; :func:`miscalibration_area` and
    :func:`rms_calibration_error` use Uncertainty Toolbox's grid :data:`CALIBRATION_LEVELS`
    (``linspace(0, 1, 100)``). Pass ``levels=CALIBRATION_LEVELS`` to get the curve those metrics integrate.

    Args:
        error: prediction minus target, any shape.
        std: predictive standard deviations, same shape, > 0.
        levels: expected coverage probabilities in [0, 1].

    Returns:
        ``(expected, observed)``, two float64 arrays of ``len(levels)``.
    """
    e, s = _error_std(error, std)
    expected = np.asarray(levels, dtype=np.float64).reshape(-1)
    if np.any((expected < 0.0) | (expected > 1.0)):
        raise ValueError("levels must lie in [0, 1]")
    return expected.copy(), _observed_coverage(np.abs(e) / s, expected)


def miscalibration_area(error, std, num_bins: int = 100) -> float:
    """Area between the observed and expected coverage curves (0 = calibrated, at most 0.5).

    Coverage of centred Gaussian intervals at ``num_bins`` expected levels ``linspace(0, 1, num_bins)``,
    joined linearly; the area is the exact integral of ``|observed - expected|`` over that polyline
    (trapezoids, or two triangles where the curves cross). Identical to Uncertainty Toolbox's
    ``miscalibration_area(y_pred, y_std, y_true, num_bins=100)``; UT's ``mean_absolute_calibration_error``
    is the plain mean over the levels instead (:func:`mean_absolute_calibration_error`), and the two
    converge as ``num_bins`` grows.

    Args:
        error: prediction minus target, any shape.
        std: predictive standard deviations, same shape, > 0.
        num_bins: number of expected levels (UT's default 100).

    Returns:
        The miscalibration area as a float.
    """
    expected, observed = coverage_curve(error, std, np.linspace(0.0, 1.0, num_bins))
    return _abs_area_piecewise_linear(expected, observed - expected)


def rms_calibration_error(error, std, num_bins: int = 100) -> float:
    """Root-mean-square of ``observed - expected`` coverage over ``linspace(0, 1, num_bins)``.

    Identical to Uncertainty Toolbox's ``root_mean_squared_calibration_error`` (centred intervals; the two
    end levels, where the difference is 0, are part of the mean as in UT).
    """
    expected, observed = coverage_curve(error, std, np.linspace(0.0, 1.0, num_bins))
    return float(np.sqrt(np.mean((observed - expected) ** 2)))


def mean_absolute_calibration_error(error, std, num_bins: int = 100) -> float:
    """Mean of ``|observed - expected|`` coverage over ``linspace(0, 1, num_bins)``.

    Identical to Uncertainty Toolbox's ``mean_absolute_calibration_error`` (a.k.a. ECE there).
    """
    expected, observed = coverage_curve(error, std, np.linspace(0.0, 1.0, num_bins))
    return float(np.mean(np.abs(observed - expected)))


def sharpness(std) -> float:
    """Mean predicted standard deviation (docs/design.md: "mean predicted std"), in the unit of the quantity.

    This differs from Uncertainty Toolbox's ``sharpness``, which is the root-mean-square
    ``sqrt(mean(σ²))``; the RMS is >= the mean, with equality only for a constant σ.
    """
    s = _flat(std, "std")
    if np.any(s < 0.0):
        raise ValueError("std must be non-negative")
    return float(np.mean(s))


def fit_std_scale(error, std) -> float:
    """Scalar ``s`` minimising the Gaussian NLL of ``error`` under the std ``s·σ``.

    ``d/ds mean[ log(s σ) + e²/(2 s² σ²) ] = 0`` gives the closed form ``s² = mean(e² / σ²)``, the mean
    squared z-score. ``s > 1`` means the model was over-confident. Used for recalibration (multiply every
    predicted std by ``s``).

    >>> fit_std_scale([2.0, -2.0], [1.0, 1.0])
    2.0
    """
    e, s = _error_std(error, std)
    return float(np.sqrt(np.mean((e / s) ** 2)))


# ------------------------------------------------------------------------------------------------ ranking
#: Relative spread below which a set of stds is one number (:func:`spearman`): float32 round-off is ~1e-7.
CONSTANT_STD_RTOL = 1e-5


def spearman(std, abs_error) -> float:
    """Spearman rank correlation of predicted std with absolute error (``scipy.stats.spearmanr``).

    Returns ``nan`` (no warning) when either input is constant or has fewer than 2 items, where the rank
    correlation is undefined; a ``nan`` in metrics.json therefore means "std carries no ranking". Stds that
    agree to a relative :data:`CONSTANT_STD_RTOL` count as constant: a single model's per-atom energy std is
    one learned number for every structure, and the round-off of dividing a total by the atom count would
    otherwise rank the structures at random.
    """
    s, a = _pair(std, abs_error, "std", "abs_error")
    if s.size < 2 or np.ptp(s) <= CONSTANT_STD_RTOL * np.abs(s).max() or np.all(a == a[0]):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(s, a).statistic
    return float(rho)


def auroc(std, abs_error, threshold: float) -> float:
    """Area under the ROC curve of ``std`` as a detector of ``abs_error > threshold``.

    Mann-Whitney form with mid-ranks for ties: ``AUC = P(σ_pos > σ_neg) + 0.5 P(σ_pos = σ_neg)`` over pairs of
    a positive (``|e| > threshold``) and a negative item, computed as
    ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with ``R_pos`` the sum of the positives' mid-ranks.
    1 = perfect detector, 0.5 = chance, 0 = inverted. ``nan`` when only one class is present.

    Args:
        std: predicted standard deviations (any non-negative score works).
        abs_error: absolute errors, same shape.
        threshold: errors strictly above it are positives (same unit as ``abs_error``).

    >>> auroc([0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 1.0], threshold=0.5)
    1.0
    """
    s, a = _pair(std, abs_error, "std", "abs_error")
    positive = a > float(threshold)
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s, method="average")
    r_pos = float(np.sum(ranks[positive]))
    return float((r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binned_rmse_rmv(abs_error, std, n_bins: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Error-vs-uncertainty calibration curve on equal-count bins of predicted std.

    Items are sorted by std and split into ``n_bins`` groups of (nearly) equal size; per group the
    root-mean-variance ``RMV = sqrt(mean σ²)`` and the ``RMSE = sqrt(mean e²)`` are returned. A calibrated
    model has ``RMSE ≈ RMV`` in every bin (Levi et al. 2022).

    Returns:
        ``(rmv, rmse, counts)``, arrays of length ``min(n_bins, n_items)``.
    """
    s, a = _pair(std, abs_error, "std", "abs_error")
    order = np.argsort(s, kind="stable")
    groups = [g for g in np.array_split(order, min(int(n_bins), s.size)) if g.size]
    rmv = np.array([np.sqrt(np.mean(s[g] ** 2)) for g in groups])
    rmse = np.array([np.sqrt(np.mean(a[g] ** 2)) for g in groups])
    counts = np.array([g.size for g in groups])
    return rmv, rmse, counts


# ------------------------------------------------------------------------------------------------- tables
def regression_metrics(
    pred,
    target,
    std=None,
    prefix: str = "forces",
    auroc_threshold: Optional[float] = None,
) -> dict[str, float]:
    """Accuracy and (when ``std`` is given) uncertainty metrics of one quantity, all plain floats.

    Keys: ``{prefix}_mae``, ``{prefix}_rmse``; with ``std`` also ``{prefix}_nll``, ``{prefix}_miscal_area``,
    ``{prefix}_rms_cal``, ``{prefix}_spearman``, ``{prefix}_sharpness``; and ``{prefix}_auroc`` when
    ``auroc_threshold`` is given as well, and ``{prefix}_n_degenerate``, the number of items left out of the
    uncertainty metrics because their std carries no information (:func:`informative`). Arrays are flattened (forces are
    scored per component).

    Args:
        pred: predictions, any shape.
        target: reference values, same shape.
        std: predictive standard deviations, same shape, > 0; ``None`` for a point model.
        prefix: key prefix (``"energy"``, ``"forces"``, ...).
        auroc_threshold: |error| threshold of the AUROC, in the unit of the quantity.
    """
    p, t = _pair(pred, target, "pred", "target")
    err = p - t
    out = {
        f"{prefix}_mae": float(np.mean(np.abs(err))),
        f"{prefix}_rmse": float(np.sqrt(np.mean(err**2))),
    }
    if std is None:
        return out
    if np.shape(std) != np.shape(pred):
        raise ValueError(f"std has shape {np.shape(std)} but pred has shape {np.shape(pred)}")
    s = _flat(std, "std")
    keep = informative(s)
    out[f"{prefix}_n_degenerate"] = int(s.size - keep.sum())
    err, s = err[keep], s[keep]
    abs_err = np.abs(err)
    out[f"{prefix}_nll"] = gaussian_nll(err, s)
    out[f"{prefix}_miscal_area"] = miscalibration_area(err, s)
    out[f"{prefix}_rms_cal"] = rms_calibration_error(err, s)
    out[f"{prefix}_spearman"] = spearman(s, abs_err)
    out[f"{prefix}_sharpness"] = sharpness(s)
    if auroc_threshold is not None:
        out[f"{prefix}_auroc"] = auroc(s, abs_err, auroc_threshold)
    return out


def evaluation_metrics(
    energy_pred_per_atom,
    energy_true_per_atom,
    energy_std_per_atom,
    forces_pred,
    forces_true,
    forces_std,
    n_samples: int,
    forces_auroc_threshold: Optional[float] = None,
) -> dict[str, float | int]:
    """The metrics.json dictionary with docs/design.md's key names (see :data:`METRIC_DEFINITIONS`).

    Args:
        energy_pred_per_atom: predicted energy / n_atoms per structure, shape (S,) (eV/atom).
        energy_true_per_atom: reference energy / n_atoms, shape (S,) (eV/atom).
        energy_std_per_atom: predictive std of energy / n_atoms, shape (S,) (eV/atom), or ``None``.
        forces_pred: predicted forces of all atoms of all structures, shape (N, 3) (eV/Å).
        forces_true: reference forces, shape (N, 3) (eV/Å).
        forces_std: predictive std per force component, shape (N, 3) (eV/Å), or ``None``.
        n_samples: number of posterior samples K behind the prediction (1 for a MAP model).
        forces_auroc_threshold: |force error| above which a component counts as "large" for
            ``forces_auroc`` (eV/Å). Default: ``2 × forces_mae`` (:data:`DEFAULT_AUROC_MAE_FACTOR`).

    Returns:
        ``energy_mae, energy_rmse, forces_mae, forces_rmse, n_structures, n_samples`` always; with
        ``energy_std_per_atom`` the ``energy_{nll, miscal_area, rms_cal, spearman, sharpness}``; with
        ``forces_std`` the ``forces_{nll, miscal_area, rms_cal, spearman, sharpness, auroc}`` and
        ``forces_auroc_threshold`` (the threshold actually used). Metric values are Python floats (a rank
        metric is ``nan`` when undefined, e.g. constant std); the two counts are Python ints.
    """
    e_pred = np.asarray(energy_pred_per_atom, dtype=np.float64)
    if e_pred.ndim != 1:
        raise ValueError(f"energy_pred_per_atom must have shape (n_structures,), got {e_pred.shape}")
    f_pred = np.asarray(forces_pred, dtype=np.float64)
    if f_pred.ndim != 2 or f_pred.shape[1] != 3:
        raise ValueError(f"forces_pred must have shape (n_atoms, 3), got {f_pred.shape}")
    if int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}")

    out: dict[str, float | int] = {}
    out.update(regression_metrics(e_pred, energy_true_per_atom, energy_std_per_atom, prefix="energy"))
    forces_acc = regression_metrics(f_pred, forces_true, None, prefix="forces")
    if forces_std is not None:
        if forces_auroc_threshold is None:
            forces_auroc_threshold = DEFAULT_AUROC_MAE_FACTOR * forces_acc["forces_mae"]
        forces_auroc_threshold = float(forces_auroc_threshold)
        if not math.isfinite(forces_auroc_threshold) or forces_auroc_threshold < 0.0:
            raise ValueError(f"forces_auroc_threshold must be finite and >= 0, got {forces_auroc_threshold}")
        out.update(regression_metrics(f_pred, forces_true, forces_std, "forces", forces_auroc_threshold))
        out["forces_auroc_threshold"] = forces_auroc_threshold
    else:
        out.update(forces_acc)
    out["n_structures"] = int(e_pred.shape[0])
    out["n_samples"] = int(n_samples)
    return out
