"""Evaluate a posterior on labelled structures: predictions, DESIGN.md metrics and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from nequip.data import AtomicDataDict

from .data import LabelKeys, atoms_to_graph, collate, read_frames
from .posterior import Posterior, load_posterior
from .posterior.predict import predict_samples
from .uq import evaluation_metrics
from .uq.plots import calibration_plot, error_vs_std_plot, parity_plot


@dataclass
class Predictions:
    """Predictive means and stds over a data set, next to the reference labels (numpy, float64).

    Energies are per atom (eV/atom) per structure, relative to the posterior's energy references where it has
    them ((E − Σ_i E_ref(Z_i)) / N, so that structures of different composition share one scale; errors are
    unchanged); forces per component (eV/Å) for all atoms. Stds are
    None for a single deterministic model; otherwise they include the aleatoric part where the model has a
    noise head, and the posterior's calibration factors.
    """

    n_atoms: np.ndarray
    energy_true: np.ndarray
    energy_pred: np.ndarray
    energy_std: Optional[np.ndarray]
    forces_true: np.ndarray
    forces_pred: np.ndarray
    forces_std: Optional[np.ndarray]
    n_samples: int


def predict_graphs(posterior: Posterior, graphs: List[AtomicDataDict.Type], batch_size: int = 16) -> Predictions:
    """Predict every labelled graph with every posterior sample, in batches of ``batch_size`` frames."""
    cols: Dict[str, list] = {k: [] for k in ("n", "et", "ep", "ev", "ft", "fp", "fve", "fva")}
    device = posterior.device
    refs = torch.tensor([posterior.energy_references.get(t, 0.0) for t in posterior.config.type_names],
                        dtype=torch.float64, device=device)
    for start in range(0, len(graphs), batch_size):
        batch = AtomicDataDict.to_(collate(graphs[start : start + batch_size]), device)
        pred = predict_samples(posterior, batch)
        n = batch[AtomicDataDict.NUM_NODES_KEY].view(-1).to(pred.energy)
        offset = torch.zeros_like(n).index_add_(
            0, batch[AtomicDataDict.BATCH_KEY], refs[batch[AtomicDataDict.ATOM_TYPE_KEY]].to(n)
        )
        cols["n"].append(n)
        cols["et"].append((batch[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1) - offset) / n)
        cols["ep"].append((pred.mean(pred.energy) - offset) / n)
        cols["ev"].append(pred.epistemic_var(pred.energy) / n**2)
        cols["ft"].append(batch[AtomicDataDict.FORCE_KEY])
        cols["fp"].append(pred.mean(pred.forces))
        cols["fve"].append(pred.epistemic_var(pred.forces))
        aleatoric = pred.forces_aleatoric_var()
        cols["fva"].append(torch.zeros_like(cols["fp"][-1]) if aleatoric is None else aleatoric)
    cat = {k: torch.cat(v).detach().cpu().double().numpy() for k, v in cols.items()}
    has_std = posterior.n_samples > 1
    has_forces_std = has_std or posterior.config.noise_head
    e_scale = posterior.calibration.get("energy", 1.0)
    f_scale = posterior.calibration.get("forces", 1.0)
    return Predictions(
        n_atoms=cat["n"].astype(int),
        energy_true=cat["et"],
        energy_pred=cat["ep"],
        energy_std=e_scale * np.sqrt(cat["ev"]) if has_std else None,
        forces_true=cat["ft"],
        forces_pred=cat["fp"],
        forces_std=f_scale * np.sqrt(cat["fve"] + cat["fva"]) if has_forces_std else None,
        n_samples=posterior.n_samples,
    )


def metrics_and_plots(pred: Predictions, plots_dir: Optional[Path] = None, title: Optional[str] = None) -> Dict:
    """DESIGN.md metrics of ``pred``; with ``plots_dir`` also parity (and, with stds, calibration) PNGs."""
    metrics = evaluation_metrics(
        pred.energy_pred, pred.energy_true, pred.energy_std,
        pred.forces_pred, pred.forces_true, pred.forces_std, n_samples=pred.n_samples,
    )
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        parity_plot(pred.energy_pred, pred.energy_true, pred.forces_pred, pred.forces_true,
                    plots_dir / "parity.png", pred.energy_std, pred.forces_std, title=title)
        if pred.forces_std is not None:
            f_err = pred.forces_pred - pred.forces_true
            calibration_plot(f_err, pred.forces_std, plots_dir / "calibration_forces.png", label="forces")
            error_vs_std_plot(np.abs(f_err), pred.forces_std, plots_dir / "error_vs_std_forces.png", label="forces")
    return metrics


def evaluate_file(
    posterior_path,
    data_path,
    out: Optional[Path] = None,
    plots_dir: Optional[Path] = None,
    keys: Optional[LabelKeys] = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> Dict:
    """``mlip-uq evaluate``: metrics of a posterior file on a labelled structure file; optionally written
    to ``out`` (JSON) and plotted into ``plots_dir``."""
    posterior = load_posterior(posterior_path).to(device)
    frames = read_frames(data_path, keys=keys, type_names=posterior.config.type_names)
    dtype = getattr(torch, posterior.config.dtype)
    graphs = [atoms_to_graph(a, posterior.config.type_names, posterior.config.r_max, dtype=dtype) for a in frames]
    metrics = metrics_and_plots(predict_graphs(posterior, graphs, batch_size), plots_dir, title=Path(data_path).name)
    if out is not None:
        write_json(metrics, out)
    return metrics


def write_json(values: Dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, allow_nan=True) + "\n")
