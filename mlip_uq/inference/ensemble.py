"""Deep ensembles: K members of one architecture, trained independently by the MAP trainer.

Member k is initialised with seed ``config.seed + k`` (and, with ``bootstrap``, trained on a resampling of the
training set drawn from that seed) and trained by :func:`~mlip_uq.inference.common.fit_map_once` in
``out_dir/members/<k>/``. Its best state dict is then written atomically to ``members/<k>/final.pt``: a member
is finished exactly when that file exists, so a killed run resumed with ``resume=True`` keeps its finished
members and continues the unfinished one from its Lightning checkpoint (``members/<k>/checkpoints/last.ckpt``).

Members train one after the other; each member's training uses the devices that ``training.accelerator`` /
``training.devices`` give Lightning (several GPUs: data-parallel within a member). Every member learns its
own observation noise with its energy model (a mean-variance ensemble: the predictive variance is the spread of
the members' means plus the mean of their noise variances).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Tuple

import numpy as np
from nequip.data import AtomicDataDict

from ..config import ConfigError, settings_from
from ..model import ModelConfig, build_model
from ..posterior import Posterior, load_posterior
from .common import fit_map_once
from .map import MAPSettings

log = logging.getLogger(__name__)


@dataclass
class EnsembleSettings:
    """Settings of a deep ensemble.

    Args:
        n_members: number K of members (= posterior samples).
        bootstrap: train each member on a bootstrap resampling (N draws with replacement) of the training set,
            drawn from the member's seed; False: every member sees the whole training set.
        training: the MAP training settings of every member (the configuration's ``training`` section).
    """

    n_members: int = 5
    bootstrap: bool = False
    training: MAPSettings = field(default_factory=MAPSettings)

    PATHS: ClassVar[Tuple[str, ...]] = ()

    def __post_init__(self):
        if self.n_members < 1:
            raise ValueError(f"ensemble.n_members must be at least 1, got {self.n_members}")

    @classmethod
    def from_dict(cls, config: Dict) -> "EnsembleSettings":
        """From a run configuration: ``ensemble`` (``n_members``, ``bootstrap``) and ``training`` (every member).

        Raises:
            ConfigError: a mistyped option, ``ensemble.training`` (the members' settings are the training
                section).
        """
        values = dict(config.get("ensemble") or {})
        if "training" in values:
            raise ConfigError("the members' training settings go in the training section, not ensemble.training")
        training = MAPSettings.from_dict(config.get("training"))
        return settings_from(cls, {**values, "training": training}, "ensemble")


Settings = EnsembleSettings


@dataclass
class UpdateSettings:
    """Active-learning updates of an ensemble (the ``update`` section).

    Args:
        max_epochs: fine-tuning epochs per member and update (None: ``training.max_epochs``).
    """

    max_epochs: Optional[int] = None

    @classmethod
    def from_dict(cls, values: Dict, settings: EnsembleSettings) -> "UpdateSettings":
        options = settings_from(cls, values, "update")
        if options.max_epochs is None:
            options.max_epochs = settings.training.max_epochs
        return options


def fit_ensemble(
    config: ModelConfig,
    train: List[AtomicDataDict.Type],
    val: List[AtomicDataDict.Type],
    settings: EnsembleSettings,
    out_dir: Path,
    resume: bool = False,
    init: Optional[Posterior] = None,
    metadata: Optional[Dict] = None,
) -> Posterior:
    """Train a deep ensemble and return it as a posterior with one sample per member.

    Args:
        config: the architecture; member k uses seed ``config.seed + k``.
        train: training graphs (each member's, or the pool its bootstrap sample is drawn from).
        val: validation graphs (early stopping and the plateau schedule of every member).
        settings: number of members, bootstrap, member training settings.
        out_dir: members go to ``out_dir/members/<k>/`` (checkpoints, CSV log, ``final.pt``).
        resume: keep finished members and continue the unfinished ones from their checkpoints.
        init: warm start (fine-tuning, e.g. after new data in an active-learning loop): a previous posterior of
            the same architecture with at least ``n_members`` samples; member k starts from its sample k
            instead of a fresh initialisation.
        metadata: passed to :class:`Posterior` (energy_references, data_fingerprint).

    Returns:
        The ensemble (``method="ensemble"``), every trainable parameter stochastic, equal weights.
    """
    out_dir = Path(out_dir)
    if init is not None and init.n_samples < settings.n_members:
        raise ValueError(f"init posterior has {init.n_samples} samples; the ensemble needs one per member "
                         f"({settings.n_members})")
    states = []
    start = time.perf_counter()
    for k in range(settings.n_members):
        seed = config.seed + k
        model = build_model(ModelConfig.from_dict({**config.to_dict(), "seed": seed}))
        if init is not None:
            try:
                model.load_state_dict(init.state_dict(k), strict=True)
            except RuntimeError as e:
                raise ValueError(f"init posterior does not match the ensemble's architecture: {e}") from e
        member_train = train
        if settings.bootstrap:
            picks = np.random.default_rng(seed).integers(0, len(train), size=len(train))
            member_train = [train[i] for i in picks]
        log.info("ensemble member %d/%d (seed %d)", k + 1, settings.n_members, seed)
        states.append(fit_map_once(model, member_train, val, settings.training, out_dir / "members" / str(k),
                                   seed=seed, resume=resume))
        log.info("ensemble member %d/%d done (%.0f s)", k + 1, settings.n_members, time.perf_counter() - start)
    hyper = {**asdict(settings), "member_seeds": [config.seed + k for k in range(settings.n_members)],
             "warm_start": init is not None}
    return Posterior.from_state_dicts(config, states, method="ensemble", hyperparameters=hyper, **(metadata or {}))


def fit(context) -> Posterior:
    """Method ``ensemble``: :func:`fit_ensemble` on the context's data, written to ``posterior.h5``."""
    posterior = fit_ensemble(context.model_config, context.train, context.val, context.settings, context.out_dir,
                             resume=context.resume, metadata=context.metadata)
    posterior.save(context.posterior_path)
    return posterior


def update(context, options: UpdateSettings, index: int) -> Path:
    """Fit ``index`` of an active-learning loop, in ``out_dir/round<index>/``: the first (``index`` 0) as
    :func:`fit`, then fine-tuning every member from round ``index - 1`` for ``options.max_epochs`` epochs.
    A killed update is finished by calling it again with ``context.resume``. Returns the posterior file."""
    rounds = Path(context.out_dir)
    init = load_posterior(rounds / f"round{index - 1:03d}" / "posterior.h5") if index > 0 else None
    settings = context.settings
    if index > 0:
        settings = dataclasses.replace(settings, training=dataclasses.replace(settings.training,
                                                                              max_epochs=options.max_epochs))
    out = rounds / f"round{index:03d}"
    posterior = fit_ensemble(context.model_config, context.train, context.val, settings, out,
                             resume=context.resume, init=init, metadata=context.metadata)
    posterior.save(out / "posterior.h5")
    return out / "posterior.h5"
