"""Per-sample predictions of a posterior and their predictive moments.

Predictive mean = weighted mean over samples. Predictive variance = epistemic (weighted variance over samples of
the predicted mean) + aleatoric (weighted mean over samples of each sample's observation-noise variance σ², which
every model writes: :class:`~mlip_uq.model.build.ObservationNoise`; for the total energy (N σ_e)², σ_e being the
noise std of the energy per atom). :func:`predictive_moments` computes them and :meth:`Moments.calibrated` applies a posterior's
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
outputs (its graph is freed at once), giving one cotangent per sample; :class:`SamplePass` then pulls back
through the one retained trunk graph what is asked: the weighted mean cotangent (one pull-back: the forces and
stress of the weighted mean energy, all that an MD step needs) and/or each sample's cotangent (per-sample
forces, for force uncertainties). Per-sample pull-backs run either as one batched vector-Jacobian product
(``torch.autograd.grad(..., is_grads_batched=True)``, the default on a GPU, not yet measured there) or one at a
time on the retained graph (the default on a CPU, where batching measured slower, 1.1-2x, and needs K times the
memory). Both give the same numbers (tested against each other and against a per-sample loop through the whole
nequip model). A per-sample force needs its own pull-back through the trunk, so a partially Bayesian posterior
saves the trunk's K-1 forward passes, not its backward passes, where per-sample forces are asked.

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

from .._keys import ENERGY_LOG_SIGMA_KEY, PER_ATOM_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY
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
# the observation-noise log-stds every sample writes (mlip_uq.model.build.ObservationNoise)
_NOISE_KEYS = (PER_ATOM_LOG_SIGMA_KEY, ENERGY_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY)
# Voigt order of ASE's stress (xx, yy, zz, yz, xz, xy)
_VOIGT = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])


@dataclass
class SamplePredictions:
    """Outputs of each of K samples on one batch of F frames and N atoms (detached).

    Attributes:
        weights: (K,) sample weights summing to one.
        energy: (K, F) total energy (eV).
        atomic_energy: (K, N) per-atom energy contributions (eV).
        forces: (K, N, 3) forces (eV/Å), or None where only their weighted mean was computed (``mean_forces``).
        stress: (K, F, 3, 3) stress (eV/Å³), or None for non-periodic frames or where only the mean was computed.
        forces_noise_var: (K, N) noise variance of each force component (eV/Å)².
        energy_noise_var: (K, F) noise variance of the total energy (eV²).
        stress_noise_var: (K, F) noise variance of each stress component (eV/Å³)².
        frame: (N,) index of each atom's frame.
        mean_forces: (N, 3) forces of the weighted mean energy (eV/Å), where ``forces`` is None.
        mean_stress: (F, 3, 3) stress of the weighted mean energy (eV/Å³), where ``stress`` is None (periodic).
    """

    weights: torch.Tensor
    energy: torch.Tensor
    atomic_energy: torch.Tensor
    forces: Optional[torch.Tensor]
    stress: Optional[torch.Tensor]
    forces_noise_var: torch.Tensor
    energy_noise_var: torch.Tensor
    stress_noise_var: torch.Tensor
    frame: torch.Tensor
    mean_forces: Optional[torch.Tensor] = None
    mean_stress: Optional[torch.Tensor] = None

    def _weighted_sum(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weights.to(x).view(-1, *([1] * (x.dim() - 1))) * x).sum(0)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted mean over the sample axis (computed about sample 0: exactly x[0] when all samples agree)."""
        return _mean_about_first(self.weights, x)

    def epistemic_var(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted variance over the sample axis (exactly zero for one sample or identical samples)."""
        d = x - x[0]
        return self._weighted_sum((d - self._weighted_sum(d)) ** 2)

    def forces_aleatoric_var(self) -> torch.Tensor:
        """(N, 3) weighted mean over samples of the noise variance, per force component."""
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


def _mean_about_first(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the leading sample axis, about sample 0 (exactly x[0] when all samples agree)."""
    w = weights.to(x).view(-1, *([1] * (x.dim() - 1)))
    return x[0] + (w * (x - x[0])).sum(0)


class SamplePass:
    """One evaluation of a posterior's K samples on one batch: the trunk once, each sample's tail once with its
    cotangent on the trunk's outputs; forces and stress are then pulled back through the trunk on demand.

    ``mean_gradients`` pulls the weighted mean cotangent back once (the gradient of the weighted mean energy:
    mean forces and stress); ``sample_gradients`` pulls back each sample's cotangent (per-sample forces and
    stress), K - 1 of them when the mean was pulled back already (the remaining sample's gradient is the mean's
    minus the others', divided by its weight). Each is computed at most once per pass, and the trunk's graph is
    kept until the per-sample gradients are done (unless ``mean_gradients(keep_graph=False)`` frees it), so a pass
    asked first for the mean and later for the samples runs the model once and pulls back K cotangents in all.

    Args:
        posterior: the posterior, on the device of ``batch``.
        batch: graphs batched by :func:`mlip_uq.data.collate` (with ``batch`` and ``num_atoms`` fields).

    Attributes:
        pullbacks: cotangents pulled back through the trunk so far (a batched pull-back of K counts K).
    """

    def __init__(self, posterior: Posterior, batch: AtomicDataDict.Type):
        model = posterior.model()
        split = split_model(posterior)
        self.posterior = posterior
        data = {k: batch[k] for k in model.model_input_fields if k in batch}
        pos = batch[AtomicDataDict.POSITIONS_KEY].detach()
        self.frame = batch[AtomicDataDict.BATCH_KEY]
        n_frames = AtomicDataDict.num_frames(batch)
        self.volume = None
        if AtomicDataDict.CELL_KEY in batch and bool(batch[AtomicDataDict.PBC_KEY].any()):
            self.volume = torch.linalg.det(batch[AtomicDataDict.CELL_KEY].view(-1, 3, 3)).abs().view(-1, 1, 1)
        k_samples = posterior.n_samples
        params = [{n[len(_PREFIX):]: t[k] for n, t in posterior.samples.items()} for k in range(k_samples)]
        with torch.enable_grad():
            pos.requires_grad_(True)
            strain = torch.zeros((n_frames, 3, 3), dtype=pos.dtype, device=pos.device, requires_grad=True)
            symmetric = 0.5 * (strain + strain.transpose(-1, -2))
            data[AtomicDataDict.POSITIONS_KEY] = pos + torch.bmm(pos.unsqueeze(-2), symmetric[self.frame]).squeeze(-2)
            if AtomicDataDict.CELL_KEY in data:
                cell = data[AtomicDataDict.CELL_KEY].view(-1, 3, 3).expand(n_frames, 3, 3)
                data[AtomicDataDict.CELL_KEY] = cell + torch.bmm(cell, symmetric)
            modules = model.model.func._modules
            for name in split.trunk:
                data = modules[name](data)
            # the trunk's differentiable outputs enter every tail as fresh leaves, so a tail's backward stops there
            leaves = {k: v.detach().requires_grad_(True) for k, v in data.items()
                      if torch.is_tensor(v) and v.requires_grad}
            keys = list(leaves)
            energy, atomic, cotangents = [], [], []
            noise: Dict[str, List[torch.Tensor]] = {key: [] for key in _NOISE_KEYS}
            for k in range(k_samples):
                out = torch.func.functional_call(split.tail, params[k], (dict(data, **leaves),), strict=False)
                e = out[AtomicDataDict.TOTAL_ENERGY_KEY]
                cotangents.append(torch.autograd.grad(e.sum(), [leaves[key] for key in keys], allow_unused=True))
                energy.append(e.detach().view(-1))
                atomic.append(out[AtomicDataDict.PER_ATOM_ENERGY_KEY].detach().view(-1))
                for key in _NOISE_KEYS:
                    noise[key].append(torch.exp(2.0 * out[key].detach().view(-1)))
                del out, e  # this sample's outputs go before the next sample's forward pass allocates its own
        self.energy, self.atomic_energy = torch.stack(energy), torch.stack(atomic)
        n_atoms = torch.bincount(self.frame, minlength=n_frames).to(self.energy)
        self.forces_noise_var = torch.stack(noise[PER_ATOM_LOG_SIGMA_KEY])
        # the noise std of the energy per atom times the number of atoms: that of the total energy
        self.energy_noise_var = torch.stack(noise[ENERGY_LOG_SIGMA_KEY]).to(self.energy) * n_atoms.square()
        self.stress_noise_var = torch.stack(noise[STRESS_LOG_SIGMA_KEY])
        # trunk outputs some tail reads, with a zero cotangent for the samples whose tail does not
        used = [i for i in range(len(keys)) if any(c[i] is not None for c in cotangents)]
        self._outputs = [data[keys[i]] for i in used]
        self._cotangents = [[torch.zeros_like(self._outputs[j]) if c[i] is None else c[i] for j, i in enumerate(used)]
                            for c in cotangents]
        self._inputs = [pos, strain]
        self._mean: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._samples: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.pullbacks = 0

    @property
    def weights(self) -> torch.Tensor:
        return self.posterior.weights

    def _pull(self, cotangents: List[List[torch.Tensor]], batched: bool, keep_graph: bool):
        """(K', N, 3) position and (K', F, 3, 3) strain gradients of ``cotangents`` (one list per sample)."""
        pos, strain = self._inputs
        zeros = (torch.zeros((len(cotangents), *pos.shape), dtype=pos.dtype, device=pos.device),
                 torch.zeros((len(cotangents), *strain.shape), dtype=pos.dtype, device=pos.device))
        if not self._outputs or not cotangents:  # the energy does not depend on the geometry (no edges)
            return zeros
        self.pullbacks += len(cotangents)
        if batched:
            stacked = [torch.stack([c[j] for c in cotangents]) for j in range(len(self._outputs))]
            grads = list(torch.autograd.grad(self._outputs, self._inputs, stacked, is_grads_batched=True,
                                             retain_graph=keep_graph, allow_unused=True))
        else:
            pulled = [torch.autograd.grad(self._outputs, self._inputs, c, allow_unused=True,
                                          retain_graph=keep_graph or k < len(cotangents) - 1)
                      for k, c in enumerate(cotangents)]
            grads = [None if pulled[0][j] is None else torch.stack([p[j] for p in pulled]) for j in (0, 1)]
        return tuple(z if g is None else g.detach() for g, z in zip(grads, zeros))

    @property
    def can_pull_back_samples(self) -> bool:
        """Whether the per-sample gradients are computed or can still be (the trunk's graph is kept)."""
        return self._samples is not None or self._cotangents is not None

    def mean_gradients(self, keep_graph: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, 3) position and (F, 3, 3) strain gradients of the weighted mean energy (one pull-back).

        Args:
            keep_graph: keep the trunk's graph for :meth:`sample_gradients`; False frees it with the pull-back
                (less memory during the backward pass: measured faster on a CPU).
        """
        if self._mean is None:
            if self._samples is not None:
                self._mean = tuple(_mean_about_first(self.weights, g) for g in self._samples)
            else:
                mean = [_mean_about_first(self.weights, torch.stack([c[j] for c in self._cotangents]))
                        for j in range(len(self._outputs))]
                self._mean = tuple(g[0] for g in self._pull([mean], batched=False, keep_graph=keep_graph))
                if not keep_graph:
                    self._outputs = self._cotangents = None
        return self._mean

    def sample_gradients(self, batched: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K, N, 3) position and (K, F, 3, 3) strain gradients of each sample's energy.

        Args:
            batched: pull the cotangents back in one batched product (``is_grads_batched``) instead of one at a
                time; default True on CUDA, False on CPU. Same results either way.
        """
        if self._samples is None:
            if not self.can_pull_back_samples:
                raise RuntimeError("the trunk's graph was freed after the mean pull-back (keep_graph=False)")
            if batched is None:
                batched = self.posterior.device.type == "cuda"
            k_samples = len(self._cotangents)
            derived = int(torch.argmax(self.weights)) if self._mean is not None and k_samples > 1 else None
            pulled = [k for k in range(k_samples) if k != derived]
            grads = self._pull([self._cotangents[k] for k in pulled], batched, keep_graph=False)
            if derived is None:
                self._samples = grads
            else:
                # sum_k w_k (g_k - mean) = 0 gives the derived sample's g (exactly the mean when all samples agree)
                samples = []
                for mean, g in zip(self._mean, grads):
                    w = self.weights.to(g).view(-1, *([1] * (g.dim() - 1)))
                    g_derived = mean - (w[pulled] * (g - mean)).sum(0) / w[derived]
                    samples.append(torch.cat([g[:derived], g_derived.unsqueeze(0), g[derived:]]))
                self._samples = tuple(samples)
            self._outputs = self._cotangents = None  # the trunk's graph is no longer needed
        return self._samples

    def _stress(self, virial: torch.Tensor) -> torch.Tensor:
        # frames without a volume get NaN stress, as in nequip's ForceStressOutput
        volume = self.volume
        return torch.where(volume > 0, virial / torch.where(volume > 0, volume, 1.0), float("nan"))

    def predictions(self, per_sample: bool, batched: Optional[bool] = None,
                    keep_graph: bool = True) -> "SamplePredictions":
        """The pass's predictions: per-sample forces and stress (``per_sample``; ``batched`` as in
        :meth:`sample_gradients`) or only their weighted means (``keep_graph`` as in :meth:`mean_gradients`)."""
        if per_sample:
            g_pos, g_strain = self.sample_gradients(batched)
            mean_forces = mean_stress = None
            forces, stress = -g_pos, None if self.volume is None else self._stress(g_strain)
        else:
            g_pos, g_strain = self.mean_gradients(keep_graph)
            forces = stress = None
            mean_forces, mean_stress = -g_pos, None if self.volume is None else self._stress(g_strain)
        return SamplePredictions(weights=self.weights, energy=self.energy, atomic_energy=self.atomic_energy,
                                 forces=forces, stress=stress, forces_noise_var=self.forces_noise_var,
                                 energy_noise_var=self.energy_noise_var, stress_noise_var=self.stress_noise_var,
                                 frame=self.frame, mean_forces=mean_forces, mean_stress=mean_stress)


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
    return SamplePass(posterior, batch).predictions(per_sample=True, batched=batched)


@dataclass
class Moments:
    """Predictive means and standard deviations of one batch of F frames and N atoms (numpy, float64).

    Every std of an observed quantity (energy, forces, stress) is sqrt(epistemic + aleatoric variance), the
    aleatoric part being the model's observation noise (module docstring); per-atom energies are not observed and
    their stds are epistemic only. After :meth:`calibrated` every std, and its epistemic part, is multiplied by the
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

    ``forces_std``, ``forces_std_epistemic``, ``stress_std`` and ``forces_samples`` are None when the predictions
    hold only the mean forces (:meth:`SamplePass.predictions` with ``per_sample=False``).
    """

    frame: np.ndarray
    n_atoms: np.ndarray
    energy: np.ndarray
    energy_std: np.ndarray
    energy_std_epistemic: np.ndarray
    energies: np.ndarray
    energies_std: np.ndarray
    forces: np.ndarray
    forces_std: Optional[np.ndarray]
    forces_std_epistemic: Optional[np.ndarray]
    stress: Optional[np.ndarray]
    stress_std: Optional[np.ndarray]
    energy_samples: np.ndarray
    forces_samples: Optional[np.ndarray]
    calibration: Dict

    @property
    def atom_force_std(self) -> Optional[np.ndarray]:
        """(N,) per-atom force uncertainty: sqrt of the sum of the three component variances (eV/Å)."""
        return None if self.forces_std is None else np.sqrt(np.sum(self.forces_std**2, axis=-1))

    @property
    def atom_force_std_epistemic(self) -> Optional[np.ndarray]:
        """(N,) epistemic part of :attr:`atom_force_std` (eV/Å)."""
        return None if self.forces_std_epistemic is None else np.sqrt(np.sum(self.forces_std_epistemic**2, axis=-1))

    def calibrated(self, calibration: Mapping) -> "Moments":
        """These moments with ``calibration`` applied (energies per atom, forces per component)."""
        if self.calibration:
            raise ValueError("these moments are already calibrated")
        check_calibration(calibration)
        r_e = std_ratio(calibration, "energy", self.energy_std / self.n_atoms)
        forces = {}
        if self.forces_std is not None:
            r_f = std_ratio(calibration, "forces", self.forces_std)
            forces = dict(forces_std=self.forces_std * r_f, forces_std_epistemic=self.forces_std_epistemic * r_f)
        return replace(
            self,
            energy_std=self.energy_std * r_e,
            energy_std_epistemic=self.energy_std_epistemic * r_e,
            energies_std=self.energies_std * r_e[self.frame],
            calibration=dict(calibration),
            **forces,
        )


def predictive_moments(pred: SamplePredictions) -> Moments:
    """Uncalibrated predictive means and stds of ``pred`` (module docstring), in float64."""
    p = SamplePredictions(**{k: None if v is None else v.detach().to(torch.float64) if v.is_floating_point() else v
                             for k, v in vars(pred).items()})

    def numpy(x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    def voigt(stress: torch.Tensor) -> torch.Tensor:
        sym = 0.5 * (stress + stress.transpose(-1, -2))
        return sym[..., _VOIGT[0], _VOIGT[1]]

    energy_var_epistemic = p.epistemic_var(p.energy)
    energy_var = energy_var_epistemic + p.mean(p.energy_noise_var)
    stress = stress_std = forces_std = forces_std_epistemic = forces_samples = None
    if p.forces is None:  # only the mean was pulled back
        forces = numpy(p.mean_forces)
        if p.mean_stress is not None:
            stress = numpy(voigt(p.mean_stress))
    else:
        forces, forces_samples = numpy(p.mean(p.forces)), numpy(p.forces)
        forces_var_epistemic = p.epistemic_var(p.forces)
        forces_var = forces_var_epistemic + p.forces_aleatoric_var()
        forces_std, forces_std_epistemic = numpy(forces_var.sqrt()), numpy(forces_var_epistemic.sqrt())
        if p.stress is not None:
            stress_var = p.epistemic_var(voigt(p.stress)) + p.mean(p.stress_noise_var).unsqueeze(-1)
            stress, stress_std = numpy(p.mean(voigt(p.stress))), numpy(stress_var.sqrt())
    frame = numpy(p.frame)
    return Moments(
        frame=frame,
        n_atoms=np.bincount(frame, minlength=p.energy.shape[1]),
        energy=numpy(p.mean(p.energy)),
        energy_std=numpy(energy_var.sqrt()),
        energy_std_epistemic=numpy(energy_var_epistemic.sqrt()),
        energies=numpy(p.mean(p.atomic_energy)),
        energies_std=numpy(p.epistemic_var(p.atomic_energy).sqrt()),
        forces=forces,
        forces_std=forces_std,
        forces_std_epistemic=forces_std_epistemic,
        stress=stress,
        stress_std=stress_std,
        energy_samples=numpy(p.energy),
        forces_samples=forces_samples,
        calibration={},
    )
