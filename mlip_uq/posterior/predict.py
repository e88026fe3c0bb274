"""Per-sample predictions of a posterior and their predictive moments.

Predictive mean = weighted mean over samples. Predictive variance = epistemic (weighted variance over
samples of the predicted mean) + aleatoric (weighted mean over samples of the noise head's σ², for forces,
where the model has a noise head). Recalibration factors are applied by the consumers of these moments
(:func:`mlip_uq.evaluate.predict_graphs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from nequip.data import AtomicDataDict

from .._keys import PER_ATOM_LOG_SIGMA_KEY
from .posterior import Posterior


@dataclass
class SamplePredictions:
    """Outputs of each of K samples on one batch of F frames and N atoms (detached).

    Attributes:
        weights: (K,) sample weights summing to one.
        energy: (K, F) total energy (eV).
        atomic_energy: (K, N) per-atom energy contributions (eV).
        forces: (K, N, 3) forces (eV/Å).
        stress: (K, F, 3, 3) stress (eV/Å³), or None for non-periodic frames.
        forces_noise_var: (K, N) noise-head variance of each force component (eV/Å)², or None.
    """

    weights: torch.Tensor
    energy: torch.Tensor
    atomic_energy: torch.Tensor
    forces: torch.Tensor
    stress: Optional[torch.Tensor]
    forces_noise_var: Optional[torch.Tensor]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted mean over the sample axis."""
        w = self.weights.to(x).view(-1, *([1] * (x.dim() - 1)))
        return (w * x).sum(0)

    def epistemic_var(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted variance over the sample axis (zero for one sample)."""
        return self.mean((x - self.mean(x)) ** 2)

    def forces_aleatoric_var(self) -> Optional[torch.Tensor]:
        """(N, 3) weighted mean over samples of the noise-head variance, per force component."""
        if self.forces_noise_var is None:
            return None
        return self.mean(self.forces_noise_var).unsqueeze(-1).expand(-1, 3)


def predict_samples(posterior: Posterior, batch: AtomicDataDict.Type) -> SamplePredictions:
    """Run every sample of ``posterior`` on ``batch`` (a nequip graph dict with a neighbour list).

    The architecture is built once; each sample's stochastic tensors are swapped in with
    ``torch.func.functional_call``. Forces and stress come from autograd, so this runs with gradients on.
    """
    model = posterior.model()
    has_cell = AtomicDataDict.CELL_KEY in batch and bool(batch[AtomicDataDict.PBC_KEY].any())
    energy, atomic, forces, stress, noise = [], [], [], [], []
    with torch.enable_grad():
        for k in range(posterior.n_samples):
            out = torch.func.functional_call(model, posterior.sample_parameters(k), (dict(batch),), strict=False)
            energy.append(out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().view(-1))
            atomic.append(out[AtomicDataDict.PER_ATOM_ENERGY_KEY].detach().view(-1))
            forces.append(out[AtomicDataDict.FORCE_KEY].detach())
            if has_cell:
                stress.append(out[AtomicDataDict.STRESS_KEY].detach().view(-1, 3, 3))
            if PER_ATOM_LOG_SIGMA_KEY in out:
                noise.append(torch.exp(2.0 * out[PER_ATOM_LOG_SIGMA_KEY].detach().view(-1)))
    return SamplePredictions(
        weights=posterior.weights,
        energy=torch.stack(energy),
        atomic_energy=torch.stack(atomic),
        forces=torch.stack(forces),
        stress=torch.stack(stress) if stress else None,
        forces_noise_var=torch.stack(noise) if noise else None,
    )
