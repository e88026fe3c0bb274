"""Recalibration of predictive standard deviations, fitted on a validation set.

A posterior's ``calibration`` (a plain dict, stored in the posterior file) maps each quantity to one
recalibration of its predictive std σ:

- a **scalar factor** ``{"energy": s_E, "forces": s_F}``: σ_cal = s·σ, with ``s`` minimising the validation
  Gaussian NLL, closed form ``s² = mean(e²/σ²)`` (:func:`~mlip_uq.uq.metrics.fit_std_scale`);
- or an **isotonic** map ``{"isotonic": {"forces": {"std": σ_knots, "calibrated_std": g_knots}}}``: σ_cal = g(σ)
  with g strictly increasing, so that recalibration never changes, nor erases, the ranking of the stds. g² is
  built from the isotonic (pool-adjacent-violators) regression of the squared validation errors e² on σ.
  Isotonic regression minimises every Bregman divergence at once, and the Gaussian NLL of e under a variance v,
  as a function of v, is one (Itakura–Saito) up to constants, so that fit is the maximum-likelihood
  non-decreasing variance map; but it is a step function, constant over each pooled block, and a constant
  block maps many distinct raw stds onto one value. The knots are therefore put at the block *centres*
  (count-weighted mean σ of each block, with the block's fitted std; centred isotonic regression), and g is
  linear between them: adjacent blocks have different values, so g is strictly increasing. A block's variance is
  the mean of its e², whose relative standard error is √(2/n) for n Gaussian errors: a block of a few components
  with small errors by chance maps its σ far too low (on well-calibrated synthetic errors, unmerged blocks gave
  knots at 0.56x the true std). Adjacent blocks are therefore merged until each holds at least ``min_count``
  errors (:data:`MIN_BLOCK_COUNT`, 50: ±20 % on a block's variance); merged blocks of increasing values keep
  increasing values. Force errors below 1e-4 eV/Å (components zero by symmetry) are left out before the fit
  (:func:`fit_calibration`): on a TiO2 validation set they were 3 % of the components, all at the smallest
  stds, and sent those stds (0.114 eV/Å) to 2e-7. Outside the knots g
  is proportional, g(σ) = g(σ_1)·σ/σ_1 below the first and g(σ_K)·σ/σ_K above the last (so an
  out-of-distribution input with a larger raw σ than any validation structure still gets a larger calibrated
  σ); with a single block the map is one factor. A raw σ of exactly 0 stays 0.

A quantity has at most one of the two. Energies are calibrated on the per-atom scale (σ_E / N, eV/atom, as the
metrics report them) and the structure's total-energy std is N·g(σ_E / N) (for a factor the scale is
irrelevant); forces per Cartesian component (eV/Å). Consumers multiply each raw std, and its epistemic part, by
:func:`std_ratio` (σ_cal/σ), so the epistemic share of the variance is unchanged by recalibration.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np
from scipy.optimize import isotonic_regression

from .metrics import fit_std_scale, informative

#: Quantities that can be recalibrated.
QUANTITIES = ("energy", "forces")


def check_calibration(calibration: Mapping) -> None:
    """Raise ``ValueError`` unless ``calibration`` has the layout of the module docstring."""
    isotonic = calibration.get("isotonic", {})
    unknown = (set(calibration) - set(QUANTITIES) - {"isotonic"}) | (set(isotonic) - set(QUANTITIES))
    if unknown:
        raise ValueError(f"unknown calibration quantity {sorted(unknown)}; known: {list(QUANTITIES)}")
    for q in QUANTITIES:
        if q in calibration and q in isotonic:
            raise ValueError(f"calibration of {q} has both a factor and an isotonic map; keep one")
        if q in calibration and not (np.isfinite(calibration[q]) and calibration[q] > 0):
            raise ValueError(f"calibration factor of {q} must be finite and > 0, got {calibration[q]}")
        if q in isotonic:
            x, y = (np.asarray(isotonic[q][k], dtype=np.float64) for k in ("std", "calibrated_std"))
            if x.ndim != 1 or x.shape != y.shape or x.size == 0 or np.any(np.diff(x) <= 0) or np.any(x <= 0) \
                    or np.any(np.diff(y) < 0) or np.any(y <= 0):
                raise ValueError(f"isotonic calibration of {q} needs increasing positive knots 'std' and "
                                 "non-decreasing positive 'calibrated_std' of one length")


def describe(calibration: Mapping) -> str:
    """One line saying what ``calibration`` does, e.g. ``energy std x1.84, forces std x0.93``."""
    parts = [f"{q} std x{calibration[q]:.4g}" for q in QUANTITIES if q in calibration]
    parts += [f"{q} std isotonic ({len(m['std'])} knots)" for q, m in calibration.get("isotonic", {}).items()]
    return ", ".join(parts) if parts else "none"


def std_ratio(calibration: Mapping, quantity: str, std) -> np.ndarray:
    """Factor σ_cal/σ for each raw std of ``quantity`` (same shape as ``std``; 1 where σ = 0 or uncalibrated).

    Args:
        calibration: a posterior's calibration dict (``{}``: none).
        quantity: ``"energy"`` (pass per-atom stds, eV/atom) or ``"forces"`` (per component, eV/Å).
        std: raw predictive stds, any shape, >= 0.
    """
    s = np.asarray(std, dtype=np.float64)
    if quantity in calibration:
        return np.full(s.shape, float(calibration[quantity]))
    iso = calibration.get("isotonic", {}).get(quantity)
    if iso is None:
        return np.ones(s.shape)
    x, y = np.asarray(iso["std"], dtype=np.float64), np.asarray(iso["calibrated_std"], dtype=np.float64)
    # linear between the knots, proportional outside them
    ratio = np.interp(s, x, y) / np.where(s > 0, s, 1.0)
    ratio = np.where(s < x[0], y[0] / x[0], ratio)
    ratio = np.where(s > x[-1], y[-1] / x[-1], ratio)
    return np.where(s > 0, ratio, 1.0)


#: force errors below this (eV/Å) are round-off of a component zero by symmetry, left out of the fits; a model
#: with force errors of std σ has one this small by chance with probability ~8e-5 / σ (0.1 % at σ = 0.08 eV/Å)
SYMMETRY_ZERO_FORCE_ERROR = 1e-4

#: the fewest validation errors an isotonic block may hold (module docstring)
MIN_BLOCK_COUNT = 50


def fit_isotonic(error, std, min_count: int = MIN_BLOCK_COUNT) -> Dict[str, np.ndarray]:
    """The strictly increasing map σ -> σ_cal of the module docstring, as knots.

    Stds that tie are pooled first (mean of e², weighted by count) so that equal σ gets equal σ_cal; the
    pool-adjacent-violators fit then pools the blocks that violate the order; adjacent blocks are merged, from
    the smallest σ up, until each holds ``min_count`` errors (a short last one joins the one before); each block
    becomes one knot at its count-weighted mean σ.

    Args:
        error: validation errors (prediction - reference), any shape.
        std: raw predictive stds, same shape, > 0.
        min_count: the fewest errors per block (fewer errors than that in all: one block, one factor).

    Returns:
        ``{"std": increasing knots (B,), "calibrated_std": increasing values (B,)}``, B = number of blocks.

    Example:
        >>> knots = fit_isotonic([1.0, -3.0, 2.0, 4.0], [1.0, 1.0, 2.0, 3.0], min_count=1)
        >>> knots["std"].round(4).tolist(), knots["calibrated_std"].round(4).tolist()
        ([1.3333, 3.0], [2.1602, 4.0])
    """
    e = np.asarray(error, dtype=np.float64).ravel()
    s = np.asarray(std, dtype=np.float64).ravel()
    if e.shape != s.shape or e.size == 0:
        raise ValueError(f"error and std must be non-empty and of one shape, got {np.shape(error)} and {np.shape(std)}")
    if not (np.all(np.isfinite(e)) and np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError("isotonic calibration needs finite errors and finite stds > 0")
    x, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_sq = np.bincount(inverse, weights=e**2) / counts
    var = isotonic_regression(mean_sq, weights=counts.astype(np.float64), increasing=True).x
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    # blocks: runs of one fitted value (equal neighbours are one block, so block values strictly increase)
    block = np.concatenate([[0], np.cumsum(np.diff(var) != 0)])
    block = _merge_small_blocks(block, np.bincount(block, weights=counts), min_count)[block]
    n = np.bincount(block, weights=counts)
    centre = np.bincount(block, weights=counts * x) / n
    value = np.maximum(np.bincount(block, weights=counts * var) / n, np.finfo(np.float64).tiny)
    return {"std": centre, "calibrated_std": np.sqrt(value)}


def _merge_small_blocks(block: np.ndarray, block_counts: np.ndarray, min_count: int) -> np.ndarray:
    """New block index of each old block: consecutive blocks joined until each holds ``min_count`` errors, from
    the first up; a last group short of it joins the group before it."""
    new = np.zeros(len(block_counts), dtype=np.int64)
    group, held = 0, 0.0
    for b, n in enumerate(block_counts):
        if held >= min_count:
            group, held = group + 1, 0.0
        new[b], held = group, held + n
    if held < min_count and group > 0:
        new[new == group] = group - 1
    return new


def fit_calibration(
    energy_error_per_atom,
    energy_std_per_atom,
    forces_error,
    forces_std,
    isotonic: bool = False,
) -> Dict:
    """Recalibration of energy and force stds fitted on validation errors (minimum validation NLL).

    Args:
        energy_error_per_atom: predicted minus reference energy per atom, (S,) eV/atom.
        energy_std_per_atom: raw predictive std of the energy per atom, (S,) eV/atom, or None (no energy std,
            e.g. one sample: energy left uncalibrated).
        forces_error: predicted minus reference forces, (N, 3) eV/Å.
        forces_std: raw predictive std per force component, (N, 3) eV/Å, or None.
        isotonic: fit isotonic maps instead of scalar factors.

    Items whose std carries no information (:func:`~mlip_uq.uq.metrics.informative`) and force components
    whose error is below :data:`SYMMETRY_ZERO_FORCE_ERROR` (zero by symmetry) are left out of the fit.

    Returns:
        A calibration dict (module docstring) for the quantities that have stds.
    """
    out: Dict = {}
    for q, err, std in (("energy", energy_error_per_atom, energy_std_per_atom), ("forces", forces_error, forces_std)):
        if std is None:
            continue
        err, std = np.ravel(err), np.ravel(std)
        if err.shape != std.shape:
            raise ValueError(f"{q}: {err.size} errors but {std.size} stds")
        # a (near-)zero std (a component zero by symmetry, an atom without neighbours) carries no information;
        # nor does a force component with a zero error: zero by symmetry in the reference and in the equivariant
        # prediction, whatever its std (3 % of a TiO2 validation set, all at the smallest stds)
        keep = informative(std)
        if q == "forces":
            keep &= np.abs(err) >= SYMMETRY_ZERO_FORCE_ERROR
        err, std = err[keep], std[keep]
        if not err.size:
            raise ValueError(f"{q}: no validation item has an informative std (and, for forces, an error of at "
                             f"least {SYMMETRY_ZERO_FORCE_ERROR} eV/Å) to fit a recalibration on")
        if isotonic:
            out.setdefault("isotonic", {})[q] = fit_isotonic(err, std)
        else:
            out[q] = fit_std_scale(err, std)
    check_calibration(out)
    return out


def calibrated_std(calibration: Optional[Mapping], quantity: str, std) -> Optional[np.ndarray]:
    """``std`` recalibrated (``None`` stays ``None``); energies per atom, forces per component."""
    if std is None:
        return None
    return np.asarray(std, dtype=np.float64) * std_ratio(calibration or {}, quantity, std)
