"""Deep ensembles: K members of one architecture, trained independently by the MAP trainer.

Member k is initialised with seed ``config.seed + k`` (and, with ``bootstrap``, trained on a resampling of the
training set drawn from that seed) and trained by :func:`~mlip_uq.inference.common.fit_map_once` in
``out_dir/members/<k>/``. Its best state dict is then written atomically to ``members/<k>/final.pt``: a member
is finished exactly when that file exists, so a killed run resumed with ``resume=True`` keeps its finished
members and continues the unfinished one from its Lightning checkpoint (``members/<k>/checkpoints/last.ckpt``).

Members train one after the other, or ``n_processes`` at a time in spawned CPU processes that share the cores
(``ensemble.n_processes``: small systems, whose tensors are too small for several threads per model to pay);
each member's training uses the devices that ``training.accelerator`` / ``training.devices`` give Lightning
(several GPUs: data-parallel within a member). Every member learns its
own observation noise with its energy model (a mean-variance ensemble: the predictive variance is the spread of
the members' means plus the mean of their noise variances).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import numpy as np
from nequip.data import AtomicDataDict

from ..files import atomic_write, load_checkpoint
from ..model import ModelConfig, build_model
from ..posterior import Posterior, load_posterior
from ..settings import ConfigError, settings_from
from . import Artifacts, FitContext, MapStart, trains_map_alike
from .common import fit_map_once, run_in_processes, save_checkpoint
from .noise import fit_posterior_noise_on_validation
from .trainer import MAPSettings, training_curves

log = logging.getLogger(__name__)


@dataclass
class EnsembleSettings:
    """Settings of a deep ensemble.

    Args:
        n_members: number K of members (= posterior samples).
        bootstrap: train each member on a bootstrap resampling (N draws with replacement) of the training set,
            drawn from the member's seed; False: every member sees the whole training set.
        n_processes: members trained at the same time, each in its own CPU process with ``cpu_count //
            n_processes`` threads; 1: one after the other in this process. A member's result does not depend
            on it, up to the floating-point summation order of torch's threaded CPU kernels.
        training: the MAP training settings of every member (the configuration's ``training`` section).
    """

    n_members: int = 5
    bootstrap: bool = False
    n_processes: int = 1
    training: MAPSettings = field(default_factory=MAPSettings)

    PATHS: ClassVar[Tuple[str, ...]] = ()

    def __post_init__(self):
        for name in ("n_members", "n_processes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ensemble.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_processes > 1 and self.training.accelerator not in ("auto", "cpu"):
            raise ConfigError(f"ensemble.n_processes > 1 trains members in CPU processes; training.accelerator "
                              f"is {self.training.accelerator!r}")

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
        lr: the fine-tuning's initial learning rate (None: a tenth of ``training.lr``). Restarting a trained
            member at the learning rate it was first trained with throws it out of its minimum: on the acac
            protocol (20 structures, ``training.lr`` 0.01, 20 epochs per update, seed 0) the test force MAE rose
            from 197 to 390 (top-k pool selection) and 526 meV/Å (random) within 24-28 calls.
        retrain: train every member afresh on the grown set at each update (its own seed, the ``training``
            settings; ``max_epochs`` and ``lr`` unused) instead of fine-tuning it. On the acac protocol neither
            fine-tuning learned the new labels (seed 0, random pool selection, 20 calls: test force MAE 197 ->
            199 meV/Å at lr 0.001 for 20 epochs, 197 -> 193-233 at lr 0.01 with the training's schedule).
    """

    max_epochs: Optional[int] = None
    lr: Optional[float] = None
    retrain: bool = False

    @classmethod
    def from_dict(cls, values: Dict, settings: EnsembleSettings) -> "UpdateSettings":
        options = settings_from(cls, values, "update")
        if options.max_epochs is None:
            options.max_epochs = settings.training.max_epochs
        if options.lr is None:
            options.lr = settings.training.lr / 10
        if options.lr <= 0:
            raise ConfigError(f"update.lr must be positive, got {options.lr}")
        return options


@dataclass
class _MemberJob:
    """What one member's training needs besides the data: its index, architecture with its seed, warm-start
    state (or None) and folder."""

    index: int
    config: ModelConfig
    init_state: Optional[Dict]
    out_dir: Path


def _train_member(job: _MemberJob, train: List[AtomicDataDict.Type], val: List[AtomicDataDict.Type],
                  settings: EnsembleSettings, resume: bool) -> Dict:
    """Train member ``job.index`` (:func:`~mlip_uq.inference.common.fit_map_once`) and return its best state."""
    model = build_model(job.config)
    if job.init_state is not None:
        try:
            model.load_state_dict(job.init_state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"init posterior does not match the ensemble's architecture: {e}") from e
    seed = job.config.seed
    member_train = train
    if settings.bootstrap:
        picks = np.random.default_rng(seed).integers(0, len(train), size=len(train))
        member_train = [train[i] for i in picks]
    log.info("ensemble member %d/%d (seed %d)", job.index + 1, settings.n_members, seed)
    state = fit_map_once(model, member_train, val, settings.training, job.out_dir, seed=seed, resume=resume)
    log.info("ensemble member %d/%d done", job.index + 1, settings.n_members)
    return state


def _train_member_to_file(job: _MemberJob, **kwargs) -> None:
    """:func:`_train_member`, its state left in ``final.pt`` (not sent back from a worker process)."""
    _train_member(job, **kwargs)


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
        The ensemble (``method="ensemble"``), every trainable parameter stochastic, equal weights. With the
        members' ``training.noise_from_validation`` the noise stds of all members are then scaled by one common
        factor per quantity fitted on ``val`` with the members' spread included
        (:func:`~mlip_uq.inference.noise.fit_posterior_noise_on_validation`, ``per_sample=False``).
    """
    out_dir = Path(out_dir)
    if init is not None and init.n_samples < settings.n_members:
        raise ValueError(f"init posterior has {init.n_samples} samples; the ensemble needs one per member "
                         f"({settings.n_members})")
    members = out_dir / "members"
    jobs = [_MemberJob(k, ModelConfig.from_dict({**config.to_dict(), "seed": config.seed + k}),
                       None if init is None else init.state_dict(k), members / str(k))
            for k in range(settings.n_members)]
    start = time.perf_counter()
    run_in_processes(_train_member_to_file, jobs, settings.n_processes, settings.training.accelerator,
                     train=train, val=val, settings=settings, resume=resume)
    states = [load_checkpoint(job.out_dir / "final.pt") for job in jobs]
    log.info("ensemble of %d members done (%.0f s)", settings.n_members, time.perf_counter() - start)
    hyper = {**asdict(settings), "member_seeds": [config.seed + k for k in range(settings.n_members)],
             "warm_start": init is not None}
    posterior = Posterior.from_state_dicts(config, states, method="ensemble", hyperparameters=hyper,
                                           **(metadata or {}))
    if settings.training.noise_from_validation and val:  # the members' own fits are done: the common factor
        posterior = fit_posterior_noise_on_validation(posterior, val, settings.training.batch_size, per_sample=False)
    return posterior


def fit(context: FitContext[EnsembleSettings]) -> Posterior:
    """Method ``ensemble``: :func:`fit_ensemble` on the context's data, written to ``posterior.h5``."""
    posterior = fit_ensemble(context.model_config, context.train, context.val, context.settings, context.out_dir,
                             resume=context.resume, metadata=context.metadata)
    posterior.save(context.posterior_path)
    return posterior


def artifacts(out_dir: Path) -> Artifacts:
    """The posterior file and every member's validation curve (``members/<k>``)."""
    return Artifacts(Path(out_dir) / "posterior.h5", training_curves(out_dir, "members/*"))


def map_start(config: Mapping[str, Any], map_config: Mapping[str, Any]) -> Optional[MapStart]:
    """Member 0 is the MAP run's model when it would be trained into it again: member k has the seed
    ``seed + k`` and the ``training`` settings, so it is when the runs share the sections a MAP fit reads
    (:func:`~mlip_uq.inference.trains_map_alike`) and the members are not bootstrapped. Then the MAP run is
    planted as the finished member 0 (:func:`plant_member_zero`)."""
    section = config.get("ensemble") or {}
    if section.get("bootstrap", False) or not trains_map_alike(config, map_config):
        return None
    return MapStart(plant=plant_member_zero)


def plant_member_zero(map_run: Artifacts, out_dir: Path) -> None:
    """Make a finished MAP run member 0 of the ensemble run in ``out_dir``: its model as the member's
    ``final.pt`` (a finished member, kept when the ensemble is resumed) and its validation curve (``.``) as the
    member's ``logs/metrics.csv``."""
    member = Path(out_dir) / "members" / "0"
    (member / "logs").mkdir(parents=True, exist_ok=True)
    save_checkpoint(load_posterior(map_run.posterior).state_dict(0), member / "final.pt")
    if "." in map_run.curves:
        with atomic_write(member / "logs" / "metrics.csv") as tmp:
            tmp.write_text(map_run.curves["."].read_text())


def update(context: FitContext[EnsembleSettings], options: UpdateSettings, index: int) -> Path:
    """Fit ``index`` of an active-learning loop, in ``out_dir/round<index>/``: the first (``index`` 0) as
    :func:`fit`, then fine-tuning every member from round ``index - 1`` for ``options.max_epochs`` epochs,
    starting at the learning rate ``options.lr`` (with ``options.retrain``: every fit as the first).
    A killed update is finished by calling it again with ``context.resume``. Returns the posterior file."""
    rounds = Path(context.out_dir)
    warm = index > 0 and not options.retrain
    init = load_posterior(rounds / f"round{index - 1:03d}" / "posterior.h5") if warm else None
    settings = context.settings
    if warm:
        settings = dataclasses.replace(settings, training=dataclasses.replace(settings.training,
                                                                              max_epochs=options.max_epochs,
                                                                              lr=options.lr))
    out = rounds / f"round{index:03d}"
    posterior = fit_ensemble(context.model_config, context.train, context.val, settings, out,
                             resume=context.resume, init=init, metadata=context.metadata)
    posterior.save(out / "posterior.h5")
    return out / "posterior.h5"
