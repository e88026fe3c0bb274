"""Training objective on energies per atom, forces and stress.

For a batch, each term is a mean over its items (frames for energy and stress, Cartesian force components
for forces). With fixed noise the force term is the mean squared error; with the heteroscedastic noise head
it is the Gaussian negative log-likelihood per component, ``0.5 * (e² / σ_i² + log σ_i²)`` (constant
``0.5 * log 2π`` dropped), where σ_i is atom i's predicted force-noise std.

Dtypes: nequip sums the per-atom energies of a float32 model in float64, so the total energy is float64 while
forces and stress come in the model's dtype (that of the positions). Each term is computed in the dtype of its
own prediction and the per-frame sums are accumulated in the energy's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
from nequip.data import AtomicDataDict

from .._keys import PER_ATOM_LOG_SIGMA_KEY


@dataclass
class LossWeights:
    """Weights of the loss terms (energy per atom in eV/atom, forces in eV/Å, stress in eV/Å³)."""

    energy: float = 1.0
    forces: float = 10.0
    stress: float = 0.0


def num_atoms_per_frame(batch: AtomicDataDict.Type) -> torch.Tensor:
    """(F,) number of atoms of each frame of a (possibly unbatched) graph dict."""
    if AtomicDataDict.NUM_NODES_KEY in batch:
        return batch[AtomicDataDict.NUM_NODES_KEY].view(-1)
    return torch.tensor([batch[AtomicDataDict.POSITIONS_KEY].shape[0]], device=batch[AtomicDataDict.POSITIONS_KEY].device)


def loss_terms(out: AtomicDataDict.Type, batch: AtomicDataDict.Type, heteroscedastic: bool) -> Dict[str, torch.Tensor]:
    """Per-term losses and plain error metrics of model output ``out`` against the labels in ``batch``.

    Returns a dict with ``energy`` (MSE of energy per atom), ``forces`` (MSE or NLL, see module docstring),
    ``stress`` (MSE over the frames that carry stress; absent when none do), and the detached metrics
    ``energy_mae`` (eV/atom) and ``forces_mae`` (eV/Å).
    """
    n_atoms = num_atoms_per_frame(batch).to(out[AtomicDataDict.TOTAL_ENERGY_KEY].dtype)
    e_err = (out[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1) - batch[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1)) / n_atoms
    f_err = out[AtomicDataDict.FORCE_KEY] - batch[AtomicDataDict.FORCE_KEY]
    terms = {"energy": e_err.square().mean()}
    if heteroscedastic:
        log_sigma = out[PER_ATOM_LOG_SIGMA_KEY].view(-1, 1)
        terms["forces"] = (0.5 * f_err.square() * torch.exp(-2.0 * log_sigma) + log_sigma).mean()
    else:
        terms["forces"] = f_err.square().mean()
    if AtomicDataDict.STRESS_KEY in batch:
        s_err = out[AtomicDataDict.STRESS_KEY].view(-1, 9) - batch[AtomicDataDict.STRESS_KEY].view(-1, 9)
        terms["stress"] = s_err.square().mean()
    terms["energy_mae"] = e_err.detach().abs().mean()
    terms["forces_mae"] = f_err.detach().abs().mean()
    return terms


def weighted_loss(terms: Dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """Σ weight · term over the terms present."""
    total = weights.energy * terms["energy"] + weights.forces * terms["forces"]
    if "stress" in terms and weights.stress:
        total = total + weights.stress * terms["stress"]
    return total


@dataclass
class NoiseModel:
    """Observation noise of the Gaussian likelihood (standard deviations).

    Attributes:
        energy: std of the energy per atom (eV/atom).
        forces: std of each force component (eV/Å); replaced per atom by the noise head when heteroscedastic.
        stress: std of each stress component (eV/Å³).
        heteroscedastic: take the force std of each atom from the model's noise head.
    """

    energy: float = 0.01
    forces: float = 0.1
    stress: float = 0.01
    heteroscedastic: bool = False


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _gaussian_nll(err: torch.Tensor, log_sigma) -> torch.Tensor:
    return 0.5 * err.square() * torch.exp(-2.0 * torch.as_tensor(log_sigma)) + log_sigma + _HALF_LOG_2PI


def neg_log_likelihood(out: AtomicDataDict.Type, batch: AtomicDataDict.Type, noise: NoiseModel) -> torch.Tensor:
    """(F,) negative log-likelihood of each frame's labels: energy per atom, every force component, and the
    nine stress components where the batch has stress; natural units, normalisation constants included.

    A sampler's potential is ``N · mean(neg_log_likelihood) − log prior`` for a data set of N frames.
    """
    n_atoms = num_atoms_per_frame(batch).to(out[AtomicDataDict.TOTAL_ENERGY_KEY].dtype)
    e_err = (out[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1) - batch[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1)) / n_atoms
    nll = _gaussian_nll(e_err, math.log(noise.energy))
    f_err = out[AtomicDataDict.FORCE_KEY] - batch[AtomicDataDict.FORCE_KEY]
    log_sigma = out[PER_ATOM_LOG_SIGMA_KEY].view(-1, 1) if noise.heteroscedastic else math.log(noise.forces)
    per_atom = _gaussian_nll(f_err, log_sigma).sum(-1)
    frame = batch.get(AtomicDataDict.BATCH_KEY, torch.zeros_like(per_atom, dtype=torch.long))
    # per-frame sums in the energy's dtype (float64 for a float32 model: nequip sums its energies in float64)
    nll = nll + torch.zeros_like(nll).index_add_(0, frame, per_atom.to(nll.dtype))
    if AtomicDataDict.STRESS_KEY in batch:
        s_err = out[AtomicDataDict.STRESS_KEY].view(-1, 9) - batch[AtomicDataDict.STRESS_KEY].view(-1, 9)
        nll = nll + _gaussian_nll(s_err, math.log(noise.stress)).sum(-1)
    return nll
