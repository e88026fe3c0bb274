"""The Gaussian likelihood of energies per atom, forces and stress, with the model's own observation noise.

Every model carries its noise stds (:class:`~mlip_uq.model.build.ObservationNoise`: learned by default, per
element for forces, per atom from the noise head with ``model.noise: head``, fixed buffers with ``noise:
fixed``) and writes their logs into its output; both objectives here read them from there, so MAP, ensemble
members and dropout models learn the noise jointly with the energy model, and SG-MCMC and VI sample it.

- :func:`neg_log_likelihood` (sampling and VI): per frame, the Gaussian negative log-likelihood
  ``0.5 e²/σ² + log σ + 0.5 log 2π`` summed over the frame's labels (its energy per atom, its 3N force
  components, its nine stress components).
- :func:`loss_terms` (MAP-type training): the same split by term, each term summed over a frame's labels and
  averaged over the frames; :func:`weighted_loss` weighs the terms, and with the default weights (all 1) it is the
  mean of :func:`neg_log_likelihood` over the batch. A frame of N atoms thus holds one energy label and 3N force
  labels, each weighted by its inverse noise variance: the learned stds set the balance between the terms (a
  mean over force components instead would weigh the energy 3N times more than the likelihood does, and a
  learned σ_e far below σ_f would then starve the forces).

Dtypes: nequip sums the per-atom energies of a float32 model in float64, so the total energy is float64 while
forces and stress come in the model's dtype (that of the positions). Each term is computed in the dtype of its
own prediction and the per-frame sums are accumulated in the energy's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from nequip.data import AtomicDataDict

from .._keys import ENERGY_LOG_SIGMA_KEY, PER_ATOM_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY


@dataclass
class LossWeights:
    """Weights of the loss terms of :func:`loss_terms`; all 1 (the default): the mean negative log-likelihood per
    frame of the energy, force and stress labels, the objective whose minimum is the maximum-likelihood (MAP with
    ``weight_decay``) model. Other weights temper a term (0: leave it out)."""

    energy: float = 1.0
    forces: float = 1.0
    stress: float = 1.0


def num_atoms_per_frame(batch: AtomicDataDict.Type) -> torch.Tensor:
    """(F,) number of atoms of each frame of a (possibly unbatched) graph dict."""
    if AtomicDataDict.NUM_NODES_KEY in batch:
        return batch[AtomicDataDict.NUM_NODES_KEY].view(-1)
    return torch.tensor([batch[AtomicDataDict.POSITIONS_KEY].shape[0]], device=batch[AtomicDataDict.POSITIONS_KEY].device)


def errors(out: AtomicDataDict.Type, batch: AtomicDataDict.Type):
    """(F,) energy-per-atom errors, (N, 3) force errors and, where the batch has stress, (F, 9) stress errors."""
    n_atoms = num_atoms_per_frame(batch).to(out[AtomicDataDict.TOTAL_ENERGY_KEY].dtype)
    e_err = (out[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1) - batch[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1)) / n_atoms
    f_err = out[AtomicDataDict.FORCE_KEY] - batch[AtomicDataDict.FORCE_KEY]
    s_err = None
    if AtomicDataDict.STRESS_KEY in batch:
        s_err = out[AtomicDataDict.STRESS_KEY].view(-1, 9) - batch[AtomicDataDict.STRESS_KEY].view(-1, 9)
    return e_err, f_err, s_err


def loss_terms(out: AtomicDataDict.Type, batch: AtomicDataDict.Type) -> Dict[str, torch.Tensor]:
    """Per-term Gaussian NLLs and plain error metrics of model output ``out`` against the labels in ``batch``.

    Returns a dict with ``energy``, ``forces`` and (over the frames that carry stress; absent when none do)
    ``stress``: each a frame's NLL of those labels, averaged over the frames (module docstring), and the
    detached metrics ``energy_mae`` (eV/atom) and ``forces_mae`` (eV/Å).
    """
    e_err, f_err, s_err = errors(out, batch)
    n_frames = e_err.shape[0]
    terms = {
        "energy": _gaussian_nll(e_err, out[ENERGY_LOG_SIGMA_KEY].view(-1)).mean(),
        "forces": _gaussian_nll(f_err, out[PER_ATOM_LOG_SIGMA_KEY].view(-1, 1)).sum() / n_frames,
    }
    if s_err is not None:
        terms["stress"] = _gaussian_nll(s_err, out[STRESS_LOG_SIGMA_KEY].view(-1, 1)).sum(-1).mean()
    terms["energy_mae"] = e_err.detach().abs().mean()
    terms["forces_mae"] = f_err.detach().abs().mean()
    return terms


def squared_error_sums(out: AtomicDataDict.Type, batch: AtomicDataDict.Type) -> Dict[str, torch.Tensor]:
    """``{term: (Σ e², number of items)}`` of the batch (float64, detached): energy per atom, force components,
    and stress components where the batch has stress."""
    e_err, f_err, s_err = errors(out, batch)
    sums = {"energy": e_err, "forces": f_err}
    if s_err is not None:
        sums["stress"] = s_err
    return {name: torch.stack([err.detach().double().square().sum(), torch.tensor(float(err.numel()),
                                                                                 dtype=torch.float64, device=err.device)])
            for name, err in sums.items()}


def profile_neg_log_likelihood(sums: Dict[str, torch.Tensor], n_frames: float, weights: "LossWeights") -> float:
    """Per-frame NLL of a data set at the best constant noise std of each term (σ² = the term's mean squared
    error): Σ_terms weight · (n_items / n_frames) · 0.5 (log MSE + 1 + log 2π).

    Model selection on held-out data with this, not with the NLL at the model's learned stds: those shrink to
    the training errors as the model fits them (50 training structures: by an order of magnitude), so the
    held-out NLL at them rises while the predictions still improve, and a schedule or early stopping on it
    stops a model that is still getting better. This one depends on the predictions alone.

    Args:
        sums: ``{term: (Σ e², n_items)}`` over the data set (:func:`squared_error_sums`, added up).
        n_frames: number of frames of the data set.
        weights: the terms' weights (:class:`LossWeights`).
    """
    total = 0.0
    for name, (sse, count) in sums.items():
        weight = getattr(weights, name)
        if weight and count > 0:
            total += weight * float(count) / n_frames * 0.5 * (math.log(float(sse) / float(count)) + 1.0 + math.log(2 * math.pi))
    return total


def weighted_loss(terms: Dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """Σ weight · term over the terms present."""
    total = weights.energy * terms["energy"] + weights.forces * terms["forces"]
    if "stress" in terms and weights.stress:
        total = total + weights.stress * terms["stress"]
    return total


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _gaussian_nll(err: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * err.square() * torch.exp(-2.0 * log_sigma) + log_sigma + _HALF_LOG_2PI


def neg_log_likelihood(out: AtomicDataDict.Type, batch: AtomicDataDict.Type,
                       weights: Optional[LossWeights] = None) -> torch.Tensor:
    """(F,) negative log-likelihood of each frame's labels: energy per atom, every force component, and the
    nine stress components where the batch has stress; with the noise stds of the model's output, natural
    units, normalisation constants included.

    A sampler's potential is ``N · mean(neg_log_likelihood) − log prior`` for a data set of N frames. With
    ``weights`` each label's term is raised to its weight (a power likelihood: energy weight w counts every
    energy label w times); None or all 1: the likelihood itself.
    """
    w = weights or LossWeights()
    e_err, f_err, s_err = errors(out, batch)
    nll = w.energy * _gaussian_nll(e_err, out[ENERGY_LOG_SIGMA_KEY].view(-1).to(e_err.dtype))
    per_atom = w.forces * _gaussian_nll(f_err, out[PER_ATOM_LOG_SIGMA_KEY].view(-1, 1)).sum(-1)
    frame = batch.get(AtomicDataDict.BATCH_KEY, torch.zeros_like(per_atom, dtype=torch.long))
    # per-frame sums in the energy's dtype (float64 for a float32 model: nequip sums its energies in float64)
    nll = nll + torch.zeros_like(nll).index_add_(0, frame, per_atom.to(nll.dtype))
    if s_err is not None and w.stress:
        nll = nll + w.stress * _gaussian_nll(s_err, out[STRESS_LOG_SIGMA_KEY].view(-1, 1)).sum(-1).to(nll.dtype)
    return nll
