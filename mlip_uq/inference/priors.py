"""Which parameters are stochastic, and their Gaussian priors.

Layers, in forward order, are the type embedding, each interaction block, and the heads (energy readout, noise
head and observation noise together). A *partially Bayesian* model samples only a chosen subset of parameters — by name
pattern or as the last N layers — and keeps the rest at their values from a deterministic phase.

A prior is Gaussian per layer: zero-centred with a scale, or **centred on pre-trained weights** (transfer
learning): the centre comes from a posterior file of ours (its weighted posterior mean) or from a state-dict
checkpoint (a Lightning/nequip ``.ckpt`` or a ``.pt`` state dict, matched to our names by suffix and shape).
Parameters without a pre-trained value fall back to zero-centred.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch

from ..files import load_checkpoint

log = logging.getLogger(__name__)

HEADS = ("per_atom_energy_readout", "noise_head", "observation_noise")


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: ``type_embed``, ``layer<i>_convnet``, ``heads`` or its module name."""
    parts = name.split(".")
    module = parts[2] if len(parts) > 2 and parts[:2] == ["model", "func"] else parts[0]
    return "heads" if module in HEADS else module


def is_noise_parameter(name: str) -> bool:
    """Whether ``name`` is an observation-noise log-factor (its prior is :attr:`GaussianPrior.noise_scale`)."""
    return ".observation_noise." in f".{name}"


def layers(model: torch.nn.Module) -> "OrderedDict[str, List[str]]":
    """Trainable parameter names grouped by layer, layers in forward order."""
    out: "OrderedDict[str, List[str]]" = OrderedDict()
    for name, p in model.named_parameters():
        if p.requires_grad:
            out.setdefault(layer_of(name), []).append(name)
    if "heads" in out:
        out.move_to_end("heads")
    return out


def select_stochastic(model: torch.nn.Module, spec: Union[str, Dict, None]) -> List[str]:
    """Names of the parameters to sample.

    Args:
        spec: ``"all"`` / None (every trainable parameter), ``{"last_layers": N}`` (the last N layers, the heads
            counting as one), or ``{"patterns": ["*readout*", ...]}`` (fnmatch patterns on parameter names).

    Raises:
        ValueError: an unknown spec, N out of range, or patterns that match nothing.
    """
    groups = layers(model)
    every = [n for names in groups.values() for n in names]
    if spec in (None, "all"):
        return every
    if not isinstance(spec, dict) or len(spec) != 1 or not set(spec) <= {"last_layers", "patterns"}:
        raise ValueError(f"stochastic must be 'all', {{last_layers: N}} or {{patterns: [...]}}, got {spec!r}")
    if "last_layers" in spec:
        n = int(spec["last_layers"])
        if not 1 <= n <= len(groups):
            raise ValueError(f"last_layers must be between 1 and {len(groups)} (layers: {list(groups)}), got {n}")
        return [name for layer in list(groups)[-n:] for name in groups[layer]]
    chosen = [n for n in every if any(fnmatch.fnmatchcase(n, pat) for pat in spec["patterns"])]
    if not chosen:
        raise ValueError(f"stochastic patterns {spec['patterns']} match no parameter; parameters: {every}")
    return chosen


@dataclass
class GaussianPrior:
    """Independent Gaussian prior N(centre, scale²) on each stochastic parameter.

    Attributes:
        scale: default prior std (parameter units).
        layer_scales: per-layer overrides of ``scale`` (keys from :func:`layers`).
        centers: pre-trained centre by parameter name; absent names are zero-centred.
        noise_scale: prior std of the observation-noise log-factors (:class:`~mlip_uq.model.build.ObservationNoise`;
            zero-centred: on the model configuration's noise stds); 1 lets a std move by a factor e either way.
    """

    scale: float = 1.0
    layer_scales: Dict[str, float] = field(default_factory=dict)
    centers: Dict[str, torch.Tensor] = field(default_factory=dict)
    noise_scale: float = 1.0

    def scale_of(self, name: str) -> float:
        if is_noise_parameter(name):
            return float(self.noise_scale)
        return float(self.layer_scales.get(layer_of(name), self.scale))

    def center_of(self, name: str, like: torch.Tensor) -> torch.Tensor:
        c = self.centers.get(name)
        return torch.zeros_like(like) if c is None else c.to(like)

    def neg_log_prob(self, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """−log p(θ) up to a constant: Σ (θ − centre)² / (2 scale²)."""
        total = 0.0
        for name, p in params.items():
            total = total + ((p - self.center_of(name, p)) ** 2).sum() / (2 * self.scale_of(name) ** 2)
        return torch.as_tensor(total)


def pretrained_weights(source: Union[str, Path], names: Sequence[str], shapes: Dict[str, torch.Size]) -> Dict[str, torch.Tensor]:
    """Pre-trained values for ``names`` (prior centres, or a chain's starting point).

    Args:
        source: an mlip_uq posterior file (``.h5``; its weighted posterior mean is the centre), or a checkpoint
            loadable with ``torch.load(weights_only=True)`` holding a state dict (a Lightning/nequip ``.ckpt``
            with a ``state_dict`` entry, or a plain ``.pt`` state dict). Checkpoint keys are matched to our
            parameter names by suffix (e.g. ``model.func.layer0...`` inside any prefix) and shape.
        names: the parameters that want a value.
        shapes: their shapes.

    Returns:
        {name: value} for the names found with a matching shape; the others are left out (as prior centres:
        zero-centred).
    """
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"pre-trained prior centre file {source} does not exist")
    if source.suffix in (".h5", ".hdf5"):
        from ..posterior import load_posterior

        post = load_posterior(source)
        w = post.weights
        state = dict(post.shared)
        state.update({n: torch.einsum("k,k...->...", w.to(t.dtype), t) for n, t in post.samples.items()})
    else:
        loaded = load_checkpoint(source)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{source} holds no state dict")
    centers = {}
    for name in names:
        suffix = name.removeprefix("model.")
        matches = [k for k in state if (k == name or k.endswith("." + suffix)) and state[k].shape == shapes[name]]
        if len(matches) == 1:
            centers[name] = state[matches[0]].detach().clone()
    return centers


def prior_from_spec(spec, model: torch.nn.Module, stochastic: Sequence[str]) -> GaussianPrior:
    """The Gaussian prior of a :class:`~mlip_uq.inference.options.PriorSettings` (scale, layer scales, centre);
    ``center`` a posterior file or checkpoint of a pre-trained model."""
    centers = {}
    if spec.center:
        shapes = {n: p.shape for n, p in model.named_parameters()}
        centers = pretrained_weights(spec.center, stochastic, shapes)
        log.info("prior centred on %s for %d of %d stochastic tensors (the rest zero-centred)",
                 spec.center, len(centers), len(stochastic))
    return GaussianPrior(scale=float(spec.scale), layer_scales=dict(spec.layer_scales), centers=centers,
                         noise_scale=float(spec.noise_scale))
