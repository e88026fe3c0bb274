"""Method ``map``: deterministic (MAP) training, the ``training`` section alone.

The result is a :class:`~mlip_uq.posterior.Posterior` with one sample (K = 1), trained by the shared MAP
trainer (:func:`~mlip_uq.inference.trainer.fit_map`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple

from ..model import build_model
from ..posterior import Posterior
from .trainer import MAPSettings, fit_map


@dataclass
class Settings:
    """Settings of method ``map``: the ``training`` section.

    Args:
        training: the MAP training settings.
    """

    training: MAPSettings

    PATHS: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, config: Dict) -> "Settings":
        """From a run configuration: the ``training`` section."""
        return cls(MAPSettings.from_dict(config.get("training")))


def fit(context) -> Posterior:
    """Method ``map``: one model trained by :func:`~mlip_uq.inference.trainer.fit_map` (its best validation
    state), as a posterior with one sample, written to ``posterior.h5``; the hyperparameters record the
    ``training`` section as given."""
    state = fit_map(build_model(context.model_config), context.train, context.val, context.settings.training,
                    context.out_dir, seed=context.model_config.seed, resume=context.resume)
    posterior = Posterior.from_state_dicts(context.model_config, [state], method="map",
                                           hyperparameters=context.config.get("training", {}), **context.metadata)
    posterior.save(context.posterior_path)
    return posterior
