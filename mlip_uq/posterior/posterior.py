"""The posterior: one model architecture plus K parameter samples.

Every training method (MAP, SG-MCMC, VI, deep ensembles, MC dropout) returns a :class:`Posterior`.
Parameters are split into *shared* tensors (one copy: buffers, and parameters kept fixed in a partially
Bayesian model) and *stochastic* tensors, stored with a leading sample axis of length K.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from nequip.nn import GraphModel

from ..model import ModelConfig, build_model, state_layout


class Posterior:
    """K parameter samples of one :class:`~mlip_uq.model.ModelConfig` architecture.

    Args:
        config: the model architecture.
        shared: tensors identical for every sample, by state-dict name.
        samples: stochastic tensors by state-dict name, each of shape (K, ...).
        weights: sample weights (K,), normalised to sum to one (default: equal).
        method: the method that made the samples (``map``, ``sgmcmc``, ``vi``, ``ensemble``, ``dropout``).
        hyperparameters: the method's settings, JSON-serialisable.
        calibration: recalibration factors of the predictive std by quantity (``energy``, ``forces``).
        energy_references: per-element reference energies (eV) the training data were referenced with.
        data_fingerprint: sha256 of the training frames.
    """

    def __init__(
        self,
        config: ModelConfig,
        shared: Dict[str, torch.Tensor],
        samples: Dict[str, torch.Tensor],
        weights: Optional[torch.Tensor] = None,
        method: str = "map",
        hyperparameters: Optional[Dict[str, Any]] = None,
        calibration: Optional[Dict[str, float]] = None,
        energy_references: Optional[Dict[str, float]] = None,
        data_fingerprint: str = "",
    ):
        sizes = {name: t.shape[0] for name, t in samples.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"stochastic tensors disagree on the number of samples: {sizes}")
        overlap = set(shared) & set(samples)
        if overlap:
            raise ValueError(f"tensors both shared and stochastic: {sorted(overlap)}")
        k = next(iter(sizes.values())) if sizes else 1
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not torch.all(weights >= 0) or weights.sum() <= 0:
            raise ValueError(f"sample weights must be {k} non-negative numbers, got {weights}")
        self.config = config
        self.shared = shared
        self.samples = samples
        self.weights = weights / weights.sum()
        self.method = method
        self.hyperparameters = dict(hyperparameters or {})
        self.calibration = dict(calibration or {})
        self.energy_references = dict(energy_references or {})
        self.data_fingerprint = data_fingerprint
        self.device = torch.device("cpu")
        self._model: Optional[GraphModel] = None

    @property
    def n_samples(self) -> int:
        return len(self.weights)

    @property
    def stochastic_names(self) -> List[str]:
        return list(self.samples)

    @classmethod
    def from_state_dicts(
        cls,
        config: ModelConfig,
        state_dicts: Sequence[Dict[str, torch.Tensor]],
        stochastic: Optional[Iterable[str]] = None,
        **metadata,
    ) -> "Posterior":
        """Make a posterior from K full state dicts of ``build_model(config)``.

        Args:
            config: the architecture the state dicts belong to.
            state_dicts: K state dicts (cloned here, so the caller may keep training its model).
            stochastic: names that differ between samples (default: every trainable parameter). The others
                are taken from the first state dict and must be equal in all of them.
            **metadata: passed to :class:`Posterior` (method, hyperparameters, energy_references, ...).
        """
        if not state_dicts:
            raise ValueError("need at least one state dict")
        if stochastic is None:
            stochastic = [n for n, (_, trainable) in state_layout(config).items() if trainable]
        stochastic = list(stochastic)
        first = state_dicts[0]
        missing = [n for n in stochastic if n not in first]
        if missing:
            raise KeyError(f"stochastic names not in the model: {missing}")
        shared = {n: t.detach().clone() for n, t in first.items() if n not in stochastic}
        for i, sd in enumerate(state_dicts[1:], start=1):
            for n, t in shared.items():
                if not torch.equal(sd[n], t):
                    raise ValueError(f"shared tensor {n} differs in state dict {i}")
        samples = {n: torch.stack([sd[n].detach() for sd in state_dicts]).clone() for n in stochastic}
        return cls(config, shared, samples, **metadata)

    def state_dict(self, k: int) -> Dict[str, torch.Tensor]:
        """The full state dict of sample ``k``."""
        if not 0 <= k < self.n_samples:
            raise IndexError(f"sample {k} out of range for {self.n_samples} samples")
        return {**self.shared, **{n: t[k] for n, t in self.samples.items()}}

    def sample_parameters(self, k: int) -> Dict[str, torch.Tensor]:
        """Only the stochastic tensors of sample ``k`` (for ``torch.func.functional_call``)."""
        return {n: t[k] for n, t in self.samples.items()}

    def model(self) -> GraphModel:
        """The architecture with the shared tensors and sample 0 loaded, in eval mode (built once)."""
        if self._model is None:
            model = build_model(self.config)
            model.load_state_dict(self.state_dict(0), strict=True)
            # prediction only: no parameter needs a gradient (autograd then keeps no inputs for weight gradients)
            model.requires_grad_(False)
            self._model = model.eval().to(self.device)
        return self._model

    def to(self, device) -> "Posterior":
        """Move the tensors (and the built model) to ``device``; returns self."""
        self.device = torch.device(device)
        self.shared = {n: t.to(self.device) for n, t in self.shared.items()}
        self.samples = {n: t.to(self.device) for n, t in self.samples.items()}
        if self._model is not None:
            self._model.to(self.device)
        return self

    def replace(self, **changes) -> "Posterior":
        """A new posterior with the given constructor arguments changed and the others (tensors included, not
        copied) taken from this one; e.g. ``post.replace(samples=new, hyperparameters=...)``.

        Raises:
            TypeError: a name that is not an argument of :class:`Posterior`.
        """
        fields = ("config", "shared", "samples", "weights", "method", "hyperparameters", "calibration",
                  "energy_references", "data_fingerprint")
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"Posterior.replace: unknown argument(s) {sorted(unknown)}; arguments: {list(fields)}")
        if "samples" in changes and "weights" not in changes:
            changes["weights"] = None  # new samples: equal weights unless given
        return Posterior(**{name: changes.get(name, getattr(self, name)) for name in fields})

    def as_dtype(self, dtype: str) -> "Posterior":
        """This posterior with its architecture and floating-point tensors in ``dtype``: itself where ``dtype`` is
        already its own, else a new posterior (tensors cast, on the same device; weights and metadata kept).

        Args:
            dtype: ``"float32"`` or ``"float64"``.

        Raises:
            ValueError: another ``dtype``.
        """
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if dtype == self.config.dtype:
            return self
        torch_dtype = getattr(torch, dtype)

        def cast(tensors):
            return {n: t.to(torch_dtype) if t.is_floating_point() else t for n, t in tensors.items()}

        other = self.replace(config=dataclasses.replace(self.config, dtype=dtype), shared=cast(self.shared),
                             samples=cast(self.samples), weights=self.weights)
        return other.to(self.device)

    def with_calibration(self, calibration: Dict[str, float]) -> "Posterior":
        """A copy sharing the tensors, with other recalibration factors."""
        other = copy.copy(self)
        other.calibration = dict(calibration)
        return other

    def save(self, path) -> None:
        from .io import save_posterior

        save_posterior(self, path)

    @classmethod
    def load(cls, path) -> "Posterior":
        from .io import load_posterior

        return load_posterior(path)

    def __repr__(self) -> str:
        n_stoch = sum(t[0].numel() for t in self.samples.values())
        n_shared = sum(t.numel() for t in self.shared.values())
        return (
            f"Posterior(method={self.method!r}, n_samples={self.n_samples}, "
            f"elements={self.config.type_names}, stochastic={n_stoch}, shared={n_shared})"
        )
