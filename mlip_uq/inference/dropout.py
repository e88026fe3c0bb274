"""MC dropout as a posterior: K dropout masks of a model trained with dropout, turned into K weight samples.

Training is MAP training (:func:`~mlip_uq.inference.map.fit_map`) of a model built with ``model.dropout > 0``
(see :mod:`mlip_uq.model.build`): in training mode each structure draws its own mask over the hidden units of
the radial networks and the readout. A posterior sample is one mask, fixed and shared by every atom and edge
of every structure it predicts, like one member of a committee: each sample is a smooth, energy-conserving
model. Dropping hidden unit j of a layer equals zeroing row j of the next linear layer's weight and scaling
the weight by 1/(1 − p), so sample k is the trained parameters with those rows masked — an ordinary
:class:`~mlip_uq.posterior.Posterior` whose stochastic tensors are the weights that read a dropped-out layer.
Prediction, calibration, the calculator and the posterior file need nothing dropout-specific.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ..model import ModelConfig, build_model
from ..model.build import draw_keep, dropout_sites
from ..posterior import Posterior


@dataclass
class DropoutSettings:
    """Settings of the MC-dropout posterior (the dropout rate itself is ``model.dropout``).

    Args:
        n_samples: number K of dropout masks, i.e. of posterior samples.
        seed: seed of the masks; the same seed gives the same K masks.
    """

    n_samples: int = 20
    seed: int = 0


def dropout_masks(model: torch.nn.Module, rate: float, n_samples: int, seed: int) -> Dict[str, torch.Tensor]:
    """K inverted-dropout multipliers per dropout site: ``{weight name: (K, width)}``, entries 0 (dropped) or
    1/(1 − rate), drawn from a ``torch.Generator`` seeded with ``seed`` (sites in model order, then samples)."""
    sites = dropout_sites(model)
    if not sites:
        raise ValueError("the model has no dropout: build it with model.dropout > 0")
    if n_samples < 1:
        raise ValueError(f"dropout.n_samples must be at least 1, got {n_samples}")
    generator = torch.Generator().manual_seed(seed)
    like = next(model.parameters())
    return {name: draw_keep(rate, (n_samples, width), like.detach().cpu(), generator) for name, width in sites.items()}


def dropout_posterior(config: ModelConfig, state: Dict[str, torch.Tensor], settings: DropoutSettings,
                      **metadata) -> Posterior:
    """The MC-dropout posterior of a model trained with dropout.

    Args:
        config: the architecture (``config.dropout`` > 0).
        state: its trained state dict (e.g. from ``fit_map``).
        settings: number of masks and their seed.
        **metadata: passed to :class:`Posterior` (hyperparameters, energy_references, data_fingerprint).

    Returns:
        A posterior with K samples: the weights reading each dropped-out hidden layer, rows masked by sample
        k's mask (:func:`dropout_masks`); every other tensor shared.
    """
    if not config.dropout:
        raise ValueError("MC dropout needs model.dropout > 0 (the rate the model was trained with)")
    masks = dropout_masks(build_model(config), config.dropout, settings.n_samples, settings.seed)
    shared = {n: t.detach().clone() for n, t in state.items() if n not in masks}
    samples = {n: keep.to(state[n]).unsqueeze(-1) * state[n] for n, keep in masks.items()}
    return Posterior(config, shared, samples, method="dropout", **metadata)
