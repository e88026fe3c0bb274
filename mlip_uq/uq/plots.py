"""Diagnostic plots: parity, calibration (coverage), error-vs-uncertainty and training curves. PNG files at 150 dpi.

Matplotlib is imported inside the functions, and figures are made with the object-oriented
``matplotlib.figure.Figure`` on an explicit Agg canvas: no backend is selected, no pyplot figure is
registered and no rcParams are touched, so these functions work headless and leave an interactive session
(or a notebook's backend) as it was. Each function returns the path it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np

from .metrics import (
    CALIBRATION_LEVELS,
    binned_rmse_rmv,
    coverage_curve,
    miscalibration_area,
)

__all__ = ["calibration_plot", "error_vs_std_plot", "parity_plot", "training_curve_plot"]

DPI = 150
#: Above this many points, scatter plots are rasterised and error bars are replaced by colour.
_MANY_POINTS = 2000

PathLike = Union[str, Path]


def new_figure(width: float, height: float):
    """A Figure attached to its own Agg canvas (no pyplot state, no backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: PathLike) -> Path:
    """Write ``fig`` as PNG (``DPI`` dots per inch) to ``path``, creating its folder; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _flat(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _parity_panel(fig, ax, pred, true, std, xlabel: str, ylabel: str, title: str, unit: str) -> None:
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    err = pred - true
    mae, rmse = float(np.mean(np.abs(err))), float(np.sqrt(np.mean(err**2)))
    label = f"MAE {mae:.3g} {unit}\nRMSE {rmse:.3g} {unit}"
    many = pred.size > _MANY_POINTS
    if std is None:
        ax.scatter(true, pred, s=4 if many else 12, alpha=0.5 if many else 0.8, lw=0, label=label,
                   rasterized=many)
    elif not many:
        ax.errorbar(true, pred, yerr=std, fmt="o", ms=3, elinewidth=0.8, alpha=0.8, label=label)
    else:
        positive = std[std > 0]
        norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size and \
            positive.max() > positive.min() else None
        order = np.argsort(std)  # most uncertain points drawn last, on top
        sc = ax.scatter(true[order], pred[order], c=np.clip(std[order], 1e-300, None), s=4, lw=0,
                        cmap="viridis", norm=norm, label=label, rasterized=True)
        fig.colorbar(sc, ax=ax, label=f"predicted std ({unit})")
    lo = float(min(true.min(), pred.min()))
    hi = float(max(true.max(), pred.max()))
    pad = 0.03 * (hi - lo) if hi > lo else 1.0
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="y = x")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)


def parity_plot(
    energy_pred,
    energy_true,
    forces_pred,
    forces_true,
    path: PathLike,
    energy_std=None,
    forces_std=None,
    title: Optional[str] = None,
) -> Path:
    """Predicted vs reference energies (eV/atom) and force components (eV/Å), side by side.

    Each panel has the y = x line and the MAE/RMSE in its legend. With a std, up to 2,000 points get
    ±1σ error bars; more points are coloured by std (log colour scale) instead.

    Args:
        energy_pred, energy_true: per-atom energies per structure, shape (S,) (eV/atom).
        forces_pred, forces_true: forces, shape (N, 3) or flat (eV/Å); plotted per Cartesian component.
        path: PNG file to write (parent folders are created).
        energy_std, forces_std: predictive stds of the same shapes, or ``None``.
        title: optional figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    ep, et = _flat(energy_pred, "energy_pred"), _flat(energy_true, "energy_true")
    fp, ft = _flat(forces_pred, "forces_pred"), _flat(forces_true, "forces_true")
    es = None if energy_std is None else _flat(energy_std, "energy_std")
    fs = None if forces_std is None else _flat(forces_std, "forces_std")
    for a, b, name in [(ep, et, "energy"), (fp, ft, "forces")]:
        if a.shape != b.shape:
            raise ValueError(f"{name}: prediction and reference differ in size ({a.size} vs {b.size})")
    if es is not None and es.shape != ep.shape:
        raise ValueError("energy_std must match energy_pred")
    if fs is not None and fs.shape != fp.shape:
        raise ValueError("forces_std must match forces_pred")

    fig = new_figure(11.0, 5.0)
    ax_e, ax_f = fig.subplots(1, 2)
    _parity_panel(fig, ax_e, ep, et, es, "reference energy (eV/atom)", "predicted energy (eV/atom)",
                  "energy per atom", "eV/atom")
    _parity_panel(fig, ax_f, fp, ft, fs, "reference force component (eV/Å)",
                  "predicted force component (eV/Å)", "force components", "eV/Å")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def calibration_plot(error, std, path: PathLike, label: str = "forces") -> Path:
    """Observed vs expected coverage of centred Gaussian intervals, with the diagonal.

    The curve is drawn on :data:`~mlip_uq.uq.metrics.CALIBRATION_LEVELS` (Uncertainty Toolbox's 100 levels),
    the same polyline whose area :func:`~mlip_uq.uq.metrics.miscalibration_area` integrates; that area is
    shaded and printed. A curve below the diagonal means over-confidence (std too small).

    Args:
        error: prediction minus target, any shape.
        std: predictive standard deviations, same shape, > 0.
        path: PNG file to write.
        label: name of the quantity for the title and legend.
    """
    expected, observed = coverage_curve(error, std, CALIBRATION_LEVELS)
    area = miscalibration_area(error, std)
    fig = new_figure(5.0, 5.0)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    ax.fill_between(expected, expected, observed, color="tab:orange", alpha=0.3,
                    label=f"miscalibration area {area:.4f}")
    ax.plot(expected, observed, color="tab:blue", lw=2, label=f"{label}")
    ax.text(0.97, 0.03, f"miscal. area = {area:.4f}", ha="right", va="bottom", transform=ax.transAxes)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("expected coverage (centred Gaussian interval)")
    ax.set_ylabel("observed coverage")
    ax.set_title(f"calibration: {label}")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def error_vs_std_plot(abs_error, std, path: PathLike, label: str = "forces", n_bins: int = 20) -> Path:
    """Absolute error against predicted std on log-log axes, with y = x and the binned RMSE-vs-RMV curve.

    Points (a hexbin density when there are more than 2,000) show ``|error|`` against ``std``; the line
    joins per-bin ``(RMV, RMSE)`` on ``n_bins`` equal-count bins of std
    (:func:`~mlip_uq.uq.metrics.binned_rmse_rmv`), which lies on y = x for a calibrated model. Items with a
    zero error or std cannot be shown on log axes and are left out of the points (not of the binned curve);
    their number is printed.

    Args:
        abs_error: absolute errors, any shape.
        std: predictive standard deviations, same shape.
        path: PNG file to write.
        label: name of the quantity (for the title).
        n_bins: number of equal-count bins of the RMSE-vs-RMV curve.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import NullFormatter

    a, s = np.abs(_flat(abs_error, "abs_error")), _flat(std, "std")
    if a.shape != s.shape:
        raise ValueError(f"abs_error and std differ in size ({a.size} vs {s.size})")
    shown = (a > 0) & (s > 0) & np.isfinite(a) & np.isfinite(s)
    rmv, rmse, _ = binned_rmse_rmv(a, s, n_bins=n_bins)

    fig = new_figure(5.5, 5.0)
    ax = fig.subplots()
    if np.any(shown):
        x, y = s[shown], a[shown]
        if x.size > _MANY_POINTS:
            hb = ax.hexbin(x, y, xscale="log", yscale="log", gridsize=40, mincnt=1, cmap="Blues",
                           norm=LogNorm())
            fig.colorbar(hb, ax=ax, label="count")
        else:
            ax.scatter(x, y, s=6, alpha=0.5, lw=0, color="tab:blue", label="items")
    ok = (rmv > 0) & (rmse > 0)
    if np.any(ok):
        ax.plot(rmv[ok], rmse[ok], "o-", color="tab:red", ms=4, lw=1.5, label="binned RMSE vs RMV")
    ax.set_xscale("log")
    ax.set_yscale("log")
    xlim, ylim = ax.get_xlim(), ax.get_ylim()  # the data's range, before the infinite y = x line
    ax.axline((1.0, 1.0), (10.0, 10.0), color="k", ls="--", lw=1, label="y = x")  # straight on log-log
    # whole decades: at least two labelled major ticks, no crowded minor labels
    for lim, set_lim, axis in [(xlim, ax.set_xlim, ax.xaxis), (ylim, ax.set_ylim, ax.yaxis)]:
        set_lim(10.0 ** np.floor(np.log10(lim[0])), 10.0 ** np.ceil(np.log10(lim[1])))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("predicted std")
    ax.set_ylabel("|error|")
    n_hidden = int(np.count_nonzero(~shown))
    hidden_note = f"\n({n_hidden} zero items not shown)" if n_hidden else ""
    ax.set_title(f"error vs uncertainty: {label}{hidden_note}")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def training_curve_plot(metrics_csv: PathLike, path: PathLike, title: Optional[str] = None) -> Path:
    """The validation energy and force MAE per epoch of a MAP-type run (its ``logs/metrics.csv``), log scale,
    with the epoch of the lowest monitored ``val_loss`` (the kept model) marked and the learning rate on a
    second axis: the plateau of the curve is where training converged.

    Args:
        metrics_csv: the run's per-epoch rows (:class:`mlip_uq.inference.trainer._MetricsRows`).
        path: PNG file to write.
        title: optional figure title.
    """
    import csv

    rows = [r for r in csv.DictReader(Path(metrics_csv).open()) if r.get("val_loss")]
    if not rows:
        raise ValueError(f"{metrics_csv} has no validation rows")
    epoch = np.array([int(r["epoch"]) + 1 for r in rows])
    column = lambda name: np.array([float(r[name]) for r in rows])  # noqa: E731
    best = int(np.argmin(column("val_loss")))
    fig = new_figure(6.5, 4.0)
    ax = fig.subplots()
    ax.plot(epoch, 1000 * column("val_energy_mae"), color="tab:blue", lw=1, label="energy MAE (meV/atom)")
    ax.plot(epoch, 1000 * column("val_forces_mae"), color="tab:orange", lw=1, label="force MAE (meV/Å)")
    ax.axvline(epoch[best], color="k", ls=":", lw=1, label=f"best epoch {epoch[best]}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MAE")
    lr = ax.twinx()
    lr.plot(epoch, column("lr"), color="0.6", lw=1, ls="--")
    lr.set_yscale("log")
    lr.set_ylabel("learning rate (dashed)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or f"validation curve ({len(rows)} epochs)")
    return save_figure(fig, path)
