"""Method ``map``: deterministic (MAP) training, the ``training`` section alone.

The result is a :class:`~mlip_uq.posterior.Posterior` with one sample (K = 1), trained by the shared MAP
trainer (:func:`~mlip_uq.inference.trainer.fit_map`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from ..model import build_model
from ..posterior import Posterior
from . import Artifacts, FitContext, MapStart
from .trainer import MAPSettings, fit_map, training_curves


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


def fit(context: FitContext[Settings]) -> Posterior:
    """Method ``map``: one model trained by :func:`~mlip_uq.inference.trainer.fit_map` (its best validation
    state), as a posterior with one sample, written to ``posterior.h5``; the hyperparameters record the
    ``training`` section as given."""
    state = fit_map(build_model(context.model_config), context.train, context.val, context.settings.training,
                    context.out_dir, seed=context.model_config.seed, resume=context.resume)
    posterior = Posterior.from_state_dicts(context.model_config, [state], method="map",
                                           hyperparameters=context.config.get("training", {}), **context.metadata)
    posterior.save(context.posterior_path)
    return posterior


def artifacts(out_dir: Path) -> Artifacts:
    """The posterior file and the model's validation curve (``.``)."""
    return Artifacts(Path(out_dir) / "posterior.h5", training_curves(out_dir, "."))


def map_start(config: Mapping[str, Any], map_config: Mapping[str, Any]) -> Optional[MapStart]:
    """None: a MAP run is its one MAP model (a study's MAP run is one)."""
    return None
