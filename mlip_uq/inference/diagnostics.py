"""Convergence diagnostics of Markov chains (numpy, float64): effective sample size and split-R̂.

Both functions take draws of shape ``(n_chains, n_draws, ...)`` and return one value per trailing coordinate
(an array of shape ``x.shape[2:]``; a 0-d array for scalar draws). A 1-d array is read as one chain.

Definitions (Vehtari, Gelman, Simpson, Carpenter, Bürkner 2021, "Rank-normalization, folding, and
localization: an improved R̂", Bayesian Analysis 16(2), sections 3.1-3.2; the classic, *not* rank-normalised,
estimators). With M chains of N draws, chain means x̄_m, chain variances s²_m (divisor N - 1):

==============================  ===========================================================================
``W``                           mean_m s²_m (within-chain variance)
``B / N``                       variance of the chain means x̄_m (divisor M - 1; 0 for one chain)
``var⁺``                        (N - 1) / N · W + B / N (pooled posterior-variance estimate)
``split_rhat``                  sqrt(var⁺ / W), computed after splitting every chain into two halves
``ρ̂_t``                         1 - (W - mean_m γ̂_{m,t}) / var⁺, γ̂_{m,t} the autocovariance of chain m at
                                lag t (divisor N, by FFT); ρ̂_0 = 1
``P̂_k``                         ρ̂_{2k} + ρ̂_{2k+1} (Geyer's paired sums)
``τ̂``                           -1 + 2 Σ_{k=0}^{K} P̂_k, with K the last index before the first P̂_k <= 0
                                (initial positive sequence) and the P̂_k made non-increasing
                                (initial monotone sequence); capped below at 1 / log10(M N)
``effective_sample_size``       M N / τ̂
==============================  ===========================================================================

The cap on τ̂ (ESS at most M N log10(M N)) is the paper's guard for antithetic chains, whose ESS exceeds the
number of draws. A coordinate with zero variance gets NaN from both functions.

:func:`write_diagnostics` and :func:`plot_traces` write a sampler run's ``diagnostics.json`` and ``trace.png``;
:func:`trace_drift` tells whether an optimisation trace (VI's negative ELBO) has stopped moving.

Caveats for SG-MCMC chains. Geyer's truncation assumes the paired sums P̂_k decay (true for reversible
chains). Underdamped SGHMC is not reversible: the autocorrelation of θ oscillates, and that of a squared
deviation (θ - μ)² behaves like ρ_θ(t)², which touches zero every half period; the sum then stops at the first
dip and the ESS of *squared* quantities (variances) can be over-estimated several-fold, while the ESS of θ
itself is under-estimated (conservative). For variances, prefer batch means over independent chains, or thin
by about one oscillation period. Chains that do not move at all still get ESS ≈ M / 2 (τ̂ <= 2N - 1), and
split-R̂ of many short chains is above 1 whenever N is not much larger than τ̂ (R̂² ≈ 1 + 2τ̂ / N for
stationary chains), so read both against the number of draws per chain.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

import numpy as np
from scipy import fft as sp_fft

from ..files import atomic_write

if TYPE_CHECKING:
    from ..posterior import Posterior

__all__ = ["effective_sample_size", "split_rhat", "trace_drift", "write_diagnostics", "plot_traces"]


def _as_chains(x: np.ndarray, min_draws: int) -> np.ndarray:
    """``x`` as float64 of shape (M, N, K), with the trailing coordinates flattened into K."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 0:
        raise ValueError("draws must have at least one axis (n_draws,) or (n_chains, n_draws, ...)")
    if x.ndim == 1:
        x = x[None]
    n_chains, n_draws = x.shape[:2]
    if n_chains < 1 or n_draws < min_draws:
        raise ValueError(f"need at least one chain of {min_draws} draws, got shape {x.shape}")
    return x.reshape(n_chains, n_draws, -1)


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Autocovariance along axis 1 of ``x`` (M, N, K), divisor N, lags 0 .. N-1, by zero-padded FFT."""
    n = x.shape[1]
    centred = x - x.mean(axis=1, keepdims=True)
    n_fft = sp_fft.next_fast_len(2 * n, real=True)
    spectrum = sp_fft.rfft(centred, n=n_fft, axis=1)
    return sp_fft.irfft(spectrum * spectrum.conj(), n=n_fft, axis=1)[:, :n] / n


def effective_sample_size(x: np.ndarray) -> np.ndarray:
    """Effective sample size of the mean, per trailing coordinate (Vehtari et al. 2021, not rank-normalised).

    Autocorrelations are estimated per chain by FFT and combined over chains through ``var⁺`` (so that chains
    that disagree lower the ESS), then summed with Geyer's initial monotone sequence; see the module docstring
    for the formulas.

    Args:
        x: draws, shape ``(n_chains, n_draws, ...)``, or ``(n_draws,)`` for one chain; at least 4 draws.

    Returns:
        ESS, shape ``x.shape[2:]`` (float64; NaN where all draws are equal).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ess = effective_sample_size(rng.normal(size=(4, 1000)))  # independent draws: ESS ≈ 4000
        >>> bool(3500 < ess < 4500)
        True
    """
    x = np.asarray(x)
    out_shape = x.shape[2:] if x.ndim > 1 else ()
    chains = _as_chains(x, min_draws=4)
    n_chains, n_draws, _ = chains.shape

    acov = _autocovariance(chains)                                  # (M, N, K)
    within = acov[:, 0].mean(axis=0) * n_draws / (n_draws - 1)      # W
    between = chains.mean(axis=1).var(axis=0, ddof=1) if n_chains > 1 else 0.0  # B / N
    var_plus = (n_draws - 1) / n_draws * within + between

    with np.errstate(divide="ignore", invalid="ignore"):
        rho = 1.0 - (within - acov.mean(axis=0)) / var_plus         # (N, K)
    rho[0] = 1.0
    n_pairs = n_draws // 2
    pairs = rho[: 2 * n_pairs].reshape(n_pairs, 2, -1).sum(axis=1)  # P̂_k, (n_pairs, K)
    initial_positive = np.cumprod(pairs > 0, axis=0).astype(bool)
    monotone = np.minimum.accumulate(pairs, axis=0)
    tau = -1.0 + 2.0 * np.where(initial_positive, monotone, 0.0).sum(axis=0)
    tau = np.maximum(tau, 1.0 / np.log10(n_chains * n_draws))
    ess = n_chains * n_draws / tau
    ess = np.where(var_plus > 0, ess, np.nan)
    return ess.reshape(out_shape)


def split_rhat(x: np.ndarray) -> np.ndarray:
    """Split-R̂ per trailing coordinate: every chain cut into two halves, then sqrt(var⁺ / W).

    Values near 1 (below 1.01 is the usual bar) mean that the half-chains agree; a chain that drifts, or
    chains stuck in different places, give R̂ > 1. With an odd number of draws the middle draw is dropped.

    Args:
        x: draws, shape ``(n_chains, n_draws, ...)``, or ``(n_draws,)`` for one chain; at least 4 draws.

    Returns:
        R̂, shape ``x.shape[2:]`` (float64; NaN where all draws are equal).
    """
    x = np.asarray(x)
    out_shape = x.shape[2:] if x.ndim > 1 else ()
    chains = _as_chains(x, min_draws=4)
    n_draws = chains.shape[1]
    half = n_draws // 2
    halves = np.concatenate([chains[:, :half], chains[:, n_draws - half:]], axis=0)  # (2M, half, K)

    within = halves.var(axis=1, ddof=1).mean(axis=0)
    between = halves.mean(axis=1).var(axis=0, ddof=1)
    var_plus = (half - 1) / half * within + between
    with np.errstate(divide="ignore", invalid="ignore"):
        rhat = np.sqrt(var_plus / within)
    rhat = np.where(within > 0, rhat, np.nan)
    return rhat.reshape(out_shape)


def trace_drift(values, fraction: float = 0.2, tolerance: float = 3.0, relative_tolerance: float = 1e-3) -> Dict:
    """Whether a noisy trace has reached its plateau: the change of its mean between the last two windows.

    The windows are the last ``fraction`` of the rows and the ``fraction`` before them. The change is compared
    with its standard error from the windows' spread (rows taken as independent: minibatch noise dominates a
    trace row to row; a slow trend is what this measures), and the trace counts as flat when the change is
    within ``tolerance`` standard errors or below ``relative_tolerance`` of the last window's mean (a long
    trace resolves trends too small to matter).

    Args:
        values: the trace, in step order (at least 2 rows per window).
        fraction: the size of each window, as a fraction of the rows.
        tolerance: standard errors within which the change counts as none.
        relative_tolerance: a relative change below which the trace counts as flat whatever its error.

    Returns:
        ``{"previous_mean", "last_mean", "change", "standard_error", "relative_change", "flat"}``; the relative
        change is the change over the magnitude of the last window's mean.

    >>> trace_drift(np.r_[np.linspace(10, 1, 50), np.ones(50)])["flat"]
    True
    >>> trace_drift(np.linspace(10, 1, 100))["flat"]
    False
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = int(round(fraction * x.size))
    if n < 2:
        raise ValueError(f"trace_drift needs at least 2 rows per window; {x.size} rows at fraction {fraction}")
    last, previous = x[-n:], x[-2 * n:-n]
    change = float(last.mean() - previous.mean())
    error = float(np.sqrt(last.var(ddof=1) / n + previous.var(ddof=1) / n))
    relative = change / max(abs(float(last.mean())), 1e-300)
    return {"previous_mean": float(previous.mean()), "last_mean": float(last.mean()), "change": change,
            "standard_error": error, "relative_change": relative,
            "flat": bool(abs(change) <= tolerance * error or abs(relative) <= relative_tolerance)}


def write_diagnostics(posterior: Posterior, work: Path) -> Dict:
    """ESS per layer (median and minimum over the layer's parameters, summed over chains) and split-R̂ across
    chains (median and maximum), written to ``diagnostics.json``; and a trace plot ``trace.png``."""
    from .priors import layer_of  # torch: imported here, so that the estimators above stay numpy-only

    chains = np.asarray(posterior.hyperparameters["sample_chains"])
    ids = sorted(set(chains.tolist()))
    n_draws = min(int((chains == c).sum()) for c in ids)
    out: Dict = {"n_chains": len(ids), "draws_per_chain": n_draws, "layers": {}}
    if n_draws >= 4:
        by_layer: Dict[str, List[np.ndarray]] = {}
        for name, t in posterior.samples.items():
            x = np.stack([t[chains == c][:n_draws].reshape(n_draws, -1).double().numpy() for c in ids])
            by_layer.setdefault(layer_of(name), []).append(x)
        for layer, xs in by_layer.items():
            x = np.concatenate(xs, axis=-1)
            x = x[..., x.std(axis=(0, 1)) > 0]  # constant coordinates have no ESS
            if x.shape[-1] == 0:
                continue
            ess = effective_sample_size(x)
            entry = {"ess_median": float(np.median(ess)), "ess_min": float(np.min(ess)), "n_params": int(x.shape[-1])}
            if len(ids) > 1:
                rhat = split_rhat(x)
                entry.update(rhat_median=float(np.nanmedian(rhat)), rhat_max=float(np.nanmax(rhat)))
            out["layers"][layer] = entry
    with atomic_write(work / "diagnostics.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2) + "\n")
    plot_traces(work)
    return out


def plot_traces(work: Path) -> None:
    """``trace.png``: N · mean NLL and the median effective step size of every chain's trace CSV."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6))
    ax_lik, ax_step = fig.subplots(2, 1, sharex=True)
    for path in sorted(work.glob("trace_chain*.csv")):
        rows = list(csv.DictReader(open(path)))
        if not rows:
            continue
        steps = [int(r["step"]) for r in rows]
        ax_lik.plot(steps, [float(r["neg_log_likelihood"]) for r in rows], lw=0.8, label=path.stem.removeprefix("trace_"))
        ax_step.plot(steps, [float(r["median_step_size"]) for r in rows], lw=0.8)
    ax_lik.set_yscale("symlog")
    ax_lik.set_ylabel("N · mean NLL")
    ax_lik.legend(fontsize=8)
    ax_step.set_yscale("log")
    ax_step.set_ylabel("median η·P (stochastic)")
    ax_step.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(work / "trace.png", dpi=120)
