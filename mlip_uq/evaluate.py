"""Evaluate a posterior on labelled structures: predictions, docs/design.md metrics and plots."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from nequip.data import AtomicDataDict

from .data import LabelKeys, atoms_to_graph, collate, read_frames
from .files import write_json
from .posterior import Posterior, load_posterior
from .posterior.io import write_calibration
from .posterior.predict import predict_samples, predictive_moments
from .uq import evaluation_metrics
from .uq.calibration import calibrated_std, check_calibration, describe, fit_calibration
from .uq.plots import calibration_plot, error_vs_std_plot, parity_plot
from .uq.signals import atom_signal

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Predictive means and stds over a data set, next to the reference labels (numpy, float64).

    Energies are per atom (eV/atom) per structure, relative to the posterior's energy references where it has
    them ((E − Σ_i E_ref(Z_i)) / N, so that structures of different composition share one scale; errors are
    unchanged); forces per component (eV/Å) for all atoms. Stds are predictive: epistemic (spread of the samples)
    plus aleatoric (the model's observation noise), so a single model has them too. ``energy_std`` and
    ``forces_std`` carry ``calibration`` (the posterior's recalibration, ``{}``: none); the ``_uncalibrated``
    fields are the raw stds. ``forces_std_epistemic`` is the epistemic part of ``forces_std`` (scaled by the
    same recalibration as the component's total std, as the calculator's ``forces_std_epistemic``).
    """

    n_atoms: np.ndarray
    energy_true: np.ndarray
    energy_pred: np.ndarray
    energy_std: np.ndarray
    forces_true: np.ndarray
    forces_pred: np.ndarray
    forces_std: np.ndarray
    n_samples: int
    energy_std_uncalibrated: np.ndarray
    forces_std_uncalibrated: np.ndarray
    calibration: Dict = field(default_factory=dict)
    forces_std_epistemic_uncalibrated: Optional[np.ndarray] = None
    forces_std_epistemic: Optional[np.ndarray] = None

    def fitted_calibration(self, isotonic: bool = False) -> Dict:
        """The recalibration of the raw stds that these labelled predictions call for (minimum Gaussian NLL:
        :func:`~mlip_uq.uq.calibration.fit_calibration`; one factor per quantity, or isotonic maps)."""
        return fit_calibration(self.energy_pred - self.energy_true, self.energy_std_uncalibrated,
                               self.forces_pred - self.forces_true, self.forces_std_uncalibrated, isotonic=isotonic)

    def _atom_signal(self, signal: str) -> Tuple[np.ndarray, np.ndarray]:
        """Per-atom uncertainty signal (:mod:`mlip_uq.uq.signals`: ``total`` is ``atom_force_std``, the square
        root of the sum of an atom's component variances) and the index of each structure's first atom."""
        def atom(std: np.ndarray) -> np.ndarray:
            return np.sqrt(np.square(std).reshape(-1, 3).sum(-1))

        total = atom(self.forces_std)
        if signal != "total" and self.forces_std_epistemic is None:
            raise ValueError(f"signal {signal!r} needs the epistemic force stds; these predictions have none")
        values = atom_signal(signal, total, total if signal == "total" else atom(self.forces_std_epistemic))
        return values, np.concatenate([[0], np.cumsum(self.n_atoms)[:-1]])

    def max_atom_force_std(self, signal: str = "total") -> np.ndarray:
        """Per structure, the largest per-atom signal (default the predictive ``atom_force_std``), shape (S,):
        the per-structure uncertainty that flags unfamiliar structures."""
        atom, first = self._atom_signal(signal)
        return np.maximum.reduceat(atom, first)

    def mean_atom_force_std(self, signal: str = "total") -> np.ndarray:
        """Per structure, the mean per-atom signal, shape (S,): unlike the largest, it does not grow with the
        number of atoms when every atom is as uncertain (the larger of two cells has more draws to take a
        maximum over)."""
        atom, first = self._atom_signal(signal)
        return np.add.reduceat(atom, first) / self.n_atoms

    def with_calibration(self, calibration: Dict) -> "Predictions":
        """The same predictions with ``calibration`` applied to the raw stds instead (``{}``: none)."""
        check_calibration(calibration)
        forces_std = calibrated_std(calibration, "forces", self.forces_std_uncalibrated)
        epistemic = None
        if self.forces_std_epistemic_uncalibrated is not None:
            raw = self.forces_std_uncalibrated
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(raw > 0, forces_std / raw, 1.0)
            epistemic = self.forces_std_epistemic_uncalibrated * ratio
        return replace(
            self,
            energy_std=calibrated_std(calibration, "energy", self.energy_std_uncalibrated),
            forces_std=forces_std,
            forces_std_epistemic=epistemic,
            calibration=dict(calibration),
        )


def predict_graphs(posterior: Posterior, graphs: List[AtomicDataDict.Type], batch_size: int = 16) -> Predictions:
    """Predict every labelled graph with every posterior sample, in batches of ``batch_size`` frames; the stds
    carry the posterior's calibration."""
    cols: Dict[str, list] = {k: [] for k in ("n", "et", "ep", "es", "ft", "fp", "fs", "fe")}
    refs = np.array([posterior.energy_references.get(t, 0.0) for t in posterior.config.type_names])
    for start in range(0, len(graphs), batch_size):
        batch = AtomicDataDict.to_(collate(graphs[start : start + batch_size]), posterior.device)
        m = predictive_moments(predict_samples(posterior, batch))
        types = batch[AtomicDataDict.ATOM_TYPE_KEY].view(-1).cpu().numpy()
        offset = np.bincount(m.frame, weights=refs[types], minlength=len(m.n_atoms))
        cols["n"].append(m.n_atoms)
        cols["et"].append((batch[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1).cpu().double().numpy() - offset) / m.n_atoms)
        cols["ep"].append((m.energy - offset) / m.n_atoms)
        cols["es"].append(m.energy_std / m.n_atoms)
        cols["ft"].append(batch[AtomicDataDict.FORCE_KEY].cpu().double().numpy())
        cols["fp"].append(m.forces)
        cols["fs"].append(m.forces_std)
        cols["fe"].append(m.forces_std_epistemic)
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    raw = Predictions(
        n_atoms=cat["n"].astype(int),
        energy_true=cat["et"],
        energy_pred=cat["ep"],
        energy_std=cat["es"],  # raw; with_calibration below applies the posterior's recalibration
        forces_true=cat["ft"],
        forces_pred=cat["fp"],
        forces_std=cat["fs"],
        n_samples=posterior.n_samples,
        energy_std_uncalibrated=cat["es"],
        forces_std_uncalibrated=cat["fs"],
        forces_std_epistemic_uncalibrated=cat["fe"],
    )
    return raw.with_calibration(posterior.calibration)


def metrics_and_plots(pred: Predictions, plots_dir: Optional[Path] = None, title: Optional[str] = None) -> Dict:
    """docs/design.md metrics of ``pred``; with ``plots_dir`` also parity (and, with stds, calibration) PNGs."""
    metrics = evaluation_metrics(
        pred.energy_pred, pred.energy_true, pred.energy_std,
        pred.forces_pred, pred.forces_true, pred.forces_std, n_samples=pred.n_samples,
    )
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        parity_plot(pred.energy_pred, pred.energy_true, pred.forces_pred, pred.forces_true,
                    plots_dir / "parity.png", pred.energy_std, pred.forces_std, title=title)
        f_err = pred.forces_pred - pred.forces_true
        calibration_plot(f_err, pred.forces_std, plots_dir / "calibration_forces.png", label="forces")
        error_vs_std_plot(np.abs(f_err), pred.forces_std, plots_dir / "error_vs_std_forces.png", label="forces")
    return metrics


def _labelled_graphs(posterior: Posterior, data_path, keys: Optional[LabelKeys],
                     indices: Optional[Sequence[int]] = None) -> List[AtomicDataDict.Type]:
    frames = read_frames(data_path, keys=keys, type_names=posterior.config.type_names)
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(frames)]
        if bad or not len(indices):
            raise ValueError(f"frame indices {bad[:5] or '(none)'} not in {data_path} ({len(frames)} frames)")
        frames = [frames[i] for i in indices]
    dtype = getattr(torch, posterior.config.dtype)
    return [atoms_to_graph(a, posterior.config.type_names, posterior.config.r_max, dtype=dtype) for a in frames]


def evaluate_file(
    posterior_path,
    data_path,
    out: Optional[Path] = None,
    plots_dir: Optional[Path] = None,
    keys: Optional[LabelKeys] = None,
    batch_size: int = 16,
    device: str = "cpu",
    indices: Optional[Sequence[int]] = None,
) -> Dict:
    """``mlip-uq evaluate``: metrics of a posterior file on a labelled structure file (only the frames
    ``indices`` of it, when given); optionally written to ``out`` (JSON) and plotted into ``plots_dir``.

    The metrics use the stds as the calculator reports them, i.e. with the posterior's calibration where it has
    one; then ``calibration`` (what was applied) and ``uncalibrated`` (the same metrics with the raw stds) are
    added, so that the file shows the metrics before and after recalibration.
    """
    posterior = load_posterior(posterior_path).to(device)
    pred = predict_graphs(posterior, _labelled_graphs(posterior, data_path, keys, indices), batch_size)
    metrics = metrics_and_plots(pred, plots_dir, title=Path(data_path).name)
    if posterior.calibration:
        log.info("stds recalibrated with the posterior's calibration: %s", describe(posterior.calibration))
        metrics["calibration"] = describe(posterior.calibration)
        metrics["uncalibrated"] = metrics_and_plots(pred.with_calibration({}))
    if out is not None:
        write_json(metrics, out)
    return metrics


def calibrate_file(
    posterior_path,
    data_path,
    isotonic: bool = False,
    indices: Optional[Sequence[int]] = None,
    out: Optional[Path] = None,
    plots_dir: Optional[Path] = None,
    keys: Optional[LabelKeys] = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> Dict:
    """``mlip-uq calibrate``: fit the recalibration of a posterior's energy and force stds on labelled
    validation structures (minimum Gaussian NLL, :mod:`mlip_uq.uq.calibration`) and write it into the posterior
    file, atomically. A previous calibration is replaced: the fit always starts from the raw stds.

    Args:
        posterior_path: the posterior file, updated in place.
        data_path: labelled validation structures (not the test set).
        isotonic: fit isotonic maps instead of one scalar factor per quantity.
        indices: use only these frames of ``data_path`` (e.g. a run's validation split from its splits.json).
        out: write the report (below) to this JSON file.
        plots_dir: write the calibration plots after recalibration into this folder.
        keys, batch_size, device: as :func:`evaluate_file`.

    Returns:
        ``{"calibration": description, "before": metrics with the raw stds, "after": metrics recalibrated}``,
        both on the validation structures.
    """
    posterior = load_posterior(posterior_path).to(device)
    graphs = _labelled_graphs(posterior, data_path, keys, indices)
    raw = predict_graphs(posterior, graphs, batch_size).with_calibration({})
    calibration = raw.fitted_calibration(isotonic)
    write_calibration(posterior_path, calibration)
    log.info("wrote the calibration into %s: %s", posterior_path, describe(calibration))
    report = {
        "calibration": describe(calibration),
        "before": metrics_and_plots(raw),
        "after": metrics_and_plots(raw.with_calibration(calibration), plots_dir, title=Path(data_path).name),
    }
    if out is not None:
        write_json(report, out)
    return report
