"""Uncertainty quality: metrics (numpy) and diagnostic plots (matplotlib, imported lazily).

Definitions follow Uncertainty Toolbox where it has one; see :mod:`mlip_uq.uq.metrics` for the table and
:data:`~mlip_uq.uq.metrics.METRIC_DEFINITIONS` for every metrics.json key.
"""

from .metrics import (
    CALIBRATION_LEVELS,
    DEFAULT_AUROC_MAE_FACTOR,
    METRIC_DEFINITIONS,
    auroc,
    binned_rmse_rmv,
    coverage_curve,
    evaluation_metrics,
    fit_std_scale,
    gaussian_nll,
    mean_absolute_calibration_error,
    miscalibration_area,
    regression_metrics,
    rms_calibration_error,
    sharpness,
    spearman,
)
from .plots import calibration_plot, error_vs_std_plot, parity_plot, training_curve_plot

__all__ = [
    "CALIBRATION_LEVELS",
    "DEFAULT_AUROC_MAE_FACTOR",
    "METRIC_DEFINITIONS",
    "auroc",
    "binned_rmse_rmv",
    "calibration_plot",
    "coverage_curve",
    "error_vs_std_plot",
    "evaluation_metrics",
    "fit_std_scale",
    "gaussian_nll",
    "mean_absolute_calibration_error",
    "miscalibration_area",
    "parity_plot",
    "regression_metrics",
    "rms_calibration_error",
    "sharpness",
    "spearman",
    "training_curve_plot",
]
