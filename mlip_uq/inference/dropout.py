"""MC dropout as a posterior: K dropout masks of a model trained with dropout, turned into K weight samples.

Training is MAP training (:func:`~mlip_uq.inference.trainer.fit_map`) of a model built with ``model.dropout > 0``
(see :mod:`mlip_uq.model.build`): in training mode each structure draws its own mask over the hidden units of
the radial networks and the readout. A posterior sample is one mask, fixed and shared by every atom and edge
of every structure it predicts, like one member of a committee: each sample is a smooth, energy-conserving
model. Dropping hidden unit j of a layer equals zeroing row j of the next linear layer's weight and scaling
the weight by 1/(1 − p), so sample k is the trained parameters with those rows masked — an ordinary
:class:`~mlip_uq.posterior.Posterior` whose stochastic tensors are the weights that read a dropped-out layer.
Prediction, calibration, the calculator and the posterior file need nothing dropout-specific.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import torch

from ..model import ModelConfig, build_model
from ..model.build import draw_keep, dropout_sites
from ..posterior import Posterior
from ..settings import ConfigError, settings_from
from . import Artifacts, FitContext, MapStart
from .noise import fit_posterior_noise_on_validation
from .trainer import MAPSettings, fit_map, training_curves


@dataclass
class DropoutSettings:
    """Settings of the MC-dropout posterior (the dropout rate itself is ``model.dropout``).

    Args:
        n_samples: number K of dropout masks, i.e. of posterior samples.
        seed: seed of the masks; the same seed gives the same K masks (default in a run: the run's ``seed``).
        training: the MAP training (with dropout active) of the model the masks are drawn for.
    """

    n_samples: int = 20
    seed: int = 0
    training: MAPSettings = field(default_factory=MAPSettings)

    PATHS: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, config: Dict) -> "DropoutSettings":
        """From a run configuration: ``dropout`` (``n_samples``, ``seed``) and ``training``.

        Raises:
            ConfigError: a mistyped option, ``model.dropout`` not > 0.
        """
        model = config.get("model", {})
        training = MAPSettings.from_dict(config.get("training"))
        if not model.get("dropout"):
            raise ConfigError("method dropout needs model.dropout > 0 (the rate of dropping hidden units)")
        values = {"seed": int(config.get("seed", 0)), **(config.get("dropout") or {})}
        return settings_from(cls, {**values, "training": training}, "dropout")


Settings = DropoutSettings


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


def fit(context: FitContext[DropoutSettings]) -> Posterior:
    """Method ``dropout``: MAP training with dropout active (:func:`~mlip_uq.inference.trainer.fit_map`), then
    the MC-dropout posterior of the trained model, written to ``posterior.h5``."""
    config, settings = context.model_config, context.settings
    state = fit_map(build_model(config), context.train, context.val, settings.training, context.out_dir,
                    seed=config.seed, resume=context.resume)
    hyper = {"n_samples": settings.n_samples, "seed": settings.seed, "rate": config.dropout,
             "training": context.config.get("training", {})}
    posterior = dropout_posterior(config, state, settings, hyperparameters=hyper, **context.metadata)
    if settings.training.noise_from_validation and context.val:  # fitted to the MAP model: the masks' factor
        posterior = fit_posterior_noise_on_validation(posterior, context.val, settings.training.batch_size,
                                                      per_sample=False)
    posterior.save(context.posterior_path)
    return posterior


def artifacts(out_dir: Path) -> Artifacts:
    """The posterior file and the validation curve of the model trained with dropout (``.``)."""
    return Artifacts(Path(out_dir) / "posterior.h5", training_curves(out_dir, "."))


def map_start(config: Mapping[str, Any], map_config: Mapping[str, Any]) -> Optional[MapStart]:
    """None: the model is trained with dropout, which a MAP run is not."""
    return None
