"""Per-sample predictions of a posterior and their predictive moments.

Predictive mean = weighted mean over samples. Predictive variance = epistemic (weighted variance over samples of
the predicted mean) + aleatoric (weighted mean over samples of the noise head's σ², for forces, where the model
has a noise head). :func:`predictive_moments` computes them and :meth:`Moments.calibrated` applies a posterior's
recalibration (:mod:`mlip_uq.uq.calibration`); the ASE calculator and :func:`mlip_uq.evaluate.predict_graphs`
both go through these two.

How the K samples run (:func:`predict_samples`)
-----------------------------------------------
nequip's energy model is a sequence of graph modules. :func:`split_model` cuts it into a *trunk*, run once per
call, and a *tail*, run once per sample with that sample's stochastic tensors swapped in
(``torch.func.functional_call``). The tail starts at the first module that holds a stochastic tensor, so for a
partially Bayesian posterior (e.g. only the readout sampled) the trunk is nearly the whole network. For a fully
Bayesian posterior the trunk is the parameter-free edge encoding (edge vectors, spherical harmonics, radial basis,
cutoff): those modules read only positions, cell and edges, so they run ahead of the stochastic type embedding,
which reads only atom types.

Forces and stress follow nequip's ``ForceStressOutput``: F = -∂E/∂r and σ = (1/V) ∂E/∂ε for a symmetric strain ε
applied to positions and cell. Each sample's energy is differentiated through its own tail down to the trunk's
outputs (its graph is freed at once); the K cotangents are then pulled back through the one trunk graph, either
in one batched vector-Jacobian product (``torch.autograd.grad(..., is_grads_batched=True)``, the default on a
GPU) or one at a time on the retained trunk graph (the default on a CPU, where batching measured no faster and
needs K times the memory). Both give the same numbers (tested against each other and against a per-sample loop
through the whole nequip model). A per-sample force needs its own pull-back through the trunk, so a partially
Bayesian posterior saves the trunk's K-1 forward passes, not its backward passes.

The K tails run in a Python loop: ``torch.func.vmap`` over stacked sample tensors fails on nequip's modules,
whose ``scatter`` adds in place into an unbatched ``torch.zeros`` tensor, which vmap rejects.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from nequip.data import AtomicDataDict
from nequip.nn import ApplyFactor
from nequip.nn.embedding import (
    BesselEdgeLengthEncoding,
    EdgeLengthNormalizer,
    NodeTypeEmbed,
    SphericalHarmonicEdgeAttrs,
)

from .._keys import PER_ATOM_LOG_SIGMA_KEY
from ..uq.calibration import check_calibration, std_ratio
from .posterior import Posterior

# state-dict prefix of the energy model's modules inside nequip's GraphModel(ForceStressOutput(...))
_PREFIX = "model.func."
# nequip blocks that read only positions, cell and edges and write only edge fields (no parameters)
_EDGE_ENCODERS = (SphericalHarmonicEdgeAttrs, EdgeLengthNormalizer, BesselEdgeLengthEncoding)
_EDGE_FIELDS = {
    AtomicDataDict.EDGE_VECTORS_KEY, AtomicDataDict.EDGE_LENGTH_KEY, AtomicDataDict.NORM_LENGTH_KEY,
    AtomicDataDict.EDGE_ATTRS_KEY, AtomicDataDict.EDGE_EMBEDDING_KEY, AtomicDataDict.EDGE_CUTOFF_KEY,
}
# Voigt order of ASE's stress (xx, yy, zz, yz, xz, xy)
_VOIGT = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])


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
        frame: (N,) index of each atom's frame.
    """

    weights: torch.Tensor
    energy: torch.Tensor
    atomic_energy: torch.Tensor
    forces: torch.Tensor
    stress: Optional[torch.Tensor]
    forces_noise_var: Optional[torch.Tensor]
    frame: torch.Tensor

    def _weighted_sum(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weights.to(x).view(-1, *([1] * (x.dim() - 1))) * x).sum(0)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted mean over the sample axis (computed about sample 0: exactly x[0] when all samples agree)."""
        return x[0] + self._weighted_sum(x - x[0])

    def epistemic_var(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted variance over the sample axis (exactly zero for one sample or identical samples)."""
        d = x - x[0]
        return self._weighted_sum((d - self._weighted_sum(d)) ** 2)

    def forces_aleatoric_var(self) -> Optional[torch.Tensor]:
        """(N, 3) weighted mean over samples of the noise-head variance, per force component."""
        if self.forces_noise_var is None:
            return None
        return self.mean(self.forces_noise_var).unsqueeze(-1).expand(-1, 3)


@dataclass
class ModelSplit:
    """A posterior's model cut into the modules run once (trunk) and once per sample (tail).

    Attributes:
        trunk: names of the trunk's modules, in the order they run.
        tail: the tail's modules as one ``torch.nn.Sequential`` (the model's own modules, not copies), whose
            parameter names are the posterior's names without the ``model.func.`` prefix.
    """

    trunk: List[str]
    tail: torch.nn.Sequential

    @property
    def tail_names(self) -> List[str]:
        return list(self.tail._modules)


_splits: "weakref.WeakKeyDictionary[Posterior, Tuple[frozenset, ModelSplit]]" = weakref.WeakKeyDictionary()


def _edge_only(module: torch.nn.Module) -> bool:
    if isinstance(module, _EDGE_ENCODERS):
        return True
    return isinstance(module, ApplyFactor) and {module.in_field, module.out_field} <= _EDGE_FIELDS


def split_model(posterior: Posterior) -> ModelSplit:
    """Trunk and tail of ``posterior.model()`` (module docstring); computed once per posterior.

    Raises:
        ValueError: a stochastic tensor outside nequip's energy model (``model.func.*``).
    """
    names = frozenset(posterior.samples)
    cached = _splits.get(posterior)
    if cached is not None and cached[0] == names:
        return cached[1]
    outside = sorted(n for n in names if not n.startswith(_PREFIX))
    if outside:
        raise ValueError(f"stochastic tensors outside the energy model ({_PREFIX}*): {outside}")
    stochastic = {n[len(_PREFIX):].split(".")[0] for n in names}
    trunk, deferred, tail = [], [], []
    for name, module in posterior.model().model.func.named_children():
        if tail:
            tail.append((name, module))
        elif name in stochastic and isinstance(module, NodeTypeEmbed):
            deferred.append((name, module))  # reads atom types only: may run after the edge encoding
        elif name in stochastic or (deferred and not _edge_only(module)):
            tail = deferred + [(name, module)]
        else:
            trunk.append(name)
    split = ModelSplit(trunk=trunk, tail=torch.nn.Sequential(OrderedDict(tail or deferred)))
    _splits[posterior] = (names, split)
    return split


def predict_samples(
    posterior: Posterior, batch: AtomicDataDict.Type, batched: Optional[bool] = None
) -> SamplePredictions:
    """Run every sample of ``posterior`` on ``batch`` (a collated nequip graph dict with a neighbour list).

    Args:
        posterior: the posterior, on the device of ``batch``.
        batch: graphs batched by :func:`mlip_uq.data.collate` (with ``batch`` and ``num_atoms`` fields).
        batched: pull the K cotangents back through the shared trunk in one batched product (True) or one at a
            time (False); default True on CUDA, False on CPU. Same results either way.

    Returns:
        The K samples' energies, per-atom energies, forces, stress (periodic frames) and noise variances.
    """
    model = posterior.model()
    split = split_model(posterior)
    if batched is None:
        batched = posterior.device.type == "cuda"
    data = {k: batch[k] for k in model.model_input_fields if k in batch}
    pos = batch[AtomicDataDict.POSITIONS_KEY].detach()
    frame = batch[AtomicDataDict.BATCH_KEY]
    n_frames = AtomicDataDict.num_frames(batch)
    has_cell = AtomicDataDict.CELL_KEY in batch and bool(batch[AtomicDataDict.PBC_KEY].any())
    k_samples = posterior.n_samples
    params = [{n[len(_PREFIX):]: t[k] for n, t in posterior.samples.items()} for k in range(k_samples)]
    with torch.enable_grad():
        pos.requires_grad_(True)
        strain = torch.zeros((n_frames, 3, 3), dtype=pos.dtype, device=pos.device, requires_grad=True)
        symmetric = 0.5 * (strain + strain.transpose(-1, -2))
        data[AtomicDataDict.POSITIONS_KEY] = pos + torch.bmm(pos.unsqueeze(-2), symmetric[frame]).squeeze(-2)
        if AtomicDataDict.CELL_KEY in data:
            cell = data[AtomicDataDict.CELL_KEY].view(-1, 3, 3).expand(n_frames, 3, 3)
            data[AtomicDataDict.CELL_KEY] = cell + torch.bmm(cell, symmetric)
        modules = model.model.func._modules
        for name in split.trunk:
            data = modules[name](data)
        # the trunk's differentiable outputs enter every tail as fresh leaves, so a tail's backward stops there
        leaves = {k: v.detach().requires_grad_(True) for k, v in data.items() if torch.is_tensor(v) and v.requires_grad}
        keys = list(leaves)
        energy, atomic, noise, cotangents = [], [], [], []
        for k in range(k_samples):
            out = torch.func.functional_call(split.tail, params[k], (dict(data, **leaves),), strict=False)
            e = out[AtomicDataDict.TOTAL_ENERGY_KEY]
            grads = torch.autograd.grad(e.sum(), [leaves[key] for key in keys], allow_unused=True)
            cotangents.append(grads)
            energy.append(e.detach().view(-1))
            atomic.append(out[AtomicDataDict.PER_ATOM_ENERGY_KEY].detach().view(-1))
            if PER_ATOM_LOG_SIGMA_KEY in out:
                noise.append(torch.exp(2.0 * out[PER_ATOM_LOG_SIGMA_KEY].detach().view(-1)))
        del out, e, grads
        # trunk outputs some tail reads, with a zero cotangent for the samples whose tail does not
        used = [i for i in range(len(keys)) if any(c[i] is not None for c in cotangents)]
        outputs = [data[keys[i]] for i in used]
        cotangents = [[torch.zeros_like(outputs[j]) if c[i] is None else c[i] for j, i in enumerate(used)]
                      for c in cotangents]
        g_pos = g_strain = None  # stay None where the energy does not depend on the geometry (no edges)
        if used and batched:
            stacked = [torch.stack([c[j] for c in cotangents]) for j in range(len(used))]
            g_pos, g_strain = torch.autograd.grad(outputs, [pos, strain], stacked, is_grads_batched=True,
                                                  allow_unused=True)
        elif used:
            pulled = [torch.autograd.grad(outputs, [pos, strain], c, retain_graph=k < k_samples - 1, allow_unused=True)
                      for k, c in enumerate(cotangents)]
            g_pos, g_strain = (None if pulled[0][j] is None else torch.stack([p[j] for p in pulled]) for j in (0, 1))
    forces = torch.zeros((k_samples, *pos.shape), dtype=pos.dtype, device=pos.device) if g_pos is None else -g_pos
    stress = None
    if has_cell:
        volume = torch.linalg.det(batch[AtomicDataDict.CELL_KEY].view(-1, 3, 3)).abs().view(1, -1, 1, 1)
        virial = torch.zeros((k_samples, n_frames, 3, 3), dtype=pos.dtype, device=pos.device) \
            if g_strain is None else g_strain
        # frames without a volume get NaN stress, as in nequip's ForceStressOutput
        stress = torch.where(volume > 0, virial / torch.where(volume > 0, volume, 1.0), float("nan"))
    return SamplePredictions(
        weights=posterior.weights,
        energy=torch.stack(energy),
        atomic_energy=torch.stack(atomic),
        forces=forces.detach(),
        stress=None if stress is None else stress.detach(),
        forces_noise_var=torch.stack(noise) if noise else None,
        frame=frame,
    )


@dataclass
class Moments:
    """Predictive means and standard deviations of one batch of F frames and N atoms (numpy, float64).

    Every std is sqrt(epistemic + aleatoric variance); only forces have an aleatoric part (the noise head's σ²,
    where the model has one). After :meth:`calibrated` every std, and its epistemic part, is multiplied by the
    recalibration factor of its quantity (:func:`mlip_uq.uq.calibration.std_ratio`); stress stds are not
    recalibrated.

    Attributes:
        frame: (N,) frame index of each atom.
        n_atoms: (F,) atoms per frame.
        energy, energy_std, energy_std_epistemic: (F,) total energy and its stds (eV).
        energies, energies_std: (N,) per-atom energy contributions and their stds (eV).
        forces, forces_std, forces_std_epistemic: (N, 3) forces and per-component stds (eV/Å).
        stress, stress_std: (F, 6) Voigt stress (ASE order xx, yy, zz, yz, xz, xy) and its std (eV/Å³), or None
            for non-periodic frames.
        energy_samples: (K, F) per-sample energies (eV); forces_samples: (K, N, 3) per-sample forces (eV/Å).
        calibration: the recalibration applied (``{}``: none).
    """

    frame: np.ndarray
    n_atoms: np.ndarray
    energy: np.ndarray
    energy_std: np.ndarray
    energy_std_epistemic: np.ndarray
    energies: np.ndarray
    energies_std: np.ndarray
    forces: np.ndarray
    forces_std: np.ndarray
    forces_std_epistemic: np.ndarray
    stress: Optional[np.ndarray]
    stress_std: Optional[np.ndarray]
    energy_samples: np.ndarray
    forces_samples: np.ndarray
    calibration: Dict

    @property
    def atom_force_std(self) -> np.ndarray:
        """(N,) per-atom force uncertainty: sqrt of the sum of the three component variances (eV/Å)."""
        return np.sqrt(np.sum(self.forces_std**2, axis=-1))

    @property
    def atom_force_std_epistemic(self) -> np.ndarray:
        """(N,) epistemic part of :attr:`atom_force_std` (eV/Å)."""
        return np.sqrt(np.sum(self.forces_std_epistemic**2, axis=-1))

    def calibrated(self, calibration: Mapping) -> "Moments":
        """These moments with ``calibration`` applied (energies per atom, forces per component)."""
        if self.calibration:
            raise ValueError("these moments are already calibrated")
        check_calibration(calibration)
        r_e = std_ratio(calibration, "energy", self.energy_std / self.n_atoms)
        r_f = std_ratio(calibration, "forces", self.forces_std)
        return replace(
            self,
            energy_std=self.energy_std * r_e,
            energy_std_epistemic=self.energy_std_epistemic * r_e,
            energies_std=self.energies_std * r_e[self.frame],
            forces_std=self.forces_std * r_f,
            forces_std_epistemic=self.forces_std_epistemic * r_f,
            calibration=dict(calibration),
        )


def predictive_moments(pred: SamplePredictions) -> Moments:
    """Uncalibrated predictive means and stds of ``pred`` (module docstring), in float64."""
    p = SamplePredictions(**{k: None if v is None else v.detach().to(torch.float64) if v.is_floating_point() else v
                             for k, v in vars(pred).items()})

    def numpy(x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    forces_var_epistemic = p.epistemic_var(p.forces)
    aleatoric = p.forces_aleatoric_var()
    forces_var = forces_var_epistemic if aleatoric is None else forces_var_epistemic + aleatoric
    energy_std = p.epistemic_var(p.energy).sqrt()
    stress = stress_std = None
    if p.stress is not None:
        sym = 0.5 * (p.stress + p.stress.transpose(-1, -2))
        voigt = sym[..., _VOIGT[0], _VOIGT[1]]
        stress, stress_std = numpy(p.mean(voigt)), numpy(p.epistemic_var(voigt).sqrt())
    frame = numpy(p.frame)
    return Moments(
        frame=frame,
        n_atoms=np.bincount(frame, minlength=p.energy.shape[1]),
        energy=numpy(p.mean(p.energy)),
        energy_std=numpy(energy_std),
        energy_std_epistemic=numpy(energy_std),
        energies=numpy(p.mean(p.atomic_energy)),
        energies_std=numpy(p.epistemic_var(p.atomic_energy).sqrt()),
        forces=numpy(p.mean(p.forces)),
        forces_std=numpy(forces_var.sqrt()),
        forces_std_epistemic=numpy(forces_var_epistemic.sqrt()),
        stress=stress,
        stress_std=stress_std,
        energy_samples=numpy(p.energy),
        forces_samples=numpy(p.forces),
        calibration={},
    )
