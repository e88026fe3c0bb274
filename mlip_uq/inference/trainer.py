"""The MAP trainer every method uses: Lightning training with Adam, a plateau schedule, early stopping, checkpoints.

:func:`fit_map` trains a model in place on energies, forces and stress (:class:`PotentialModule`, the
``training`` section's :class:`MAPSettings`) and returns its best validation state. Lightning provides the loop,
the progress bar, checkpointing with ``--resume`` and multi-device training. Method ``map``
(:mod:`mlip_uq.inference.map`) is this training alone; the ensemble's members, MC dropout and the MAP starts of
SG-MCMC and VI use it too.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
from nequip.data import AtomicDataDict
from nequip.nn import GraphModel
from torch.utils.data import DataLoader

from ..data import collate
from ..files import appending_csv, load_checkpoint
from ..settings import ConfigError, settings_from
from ..uq.plots import training_curve_plot
from .loss import LossWeights, loss_terms, profile_neg_log_likelihood, squared_error_sums, weighted_loss
from .noise import fit_noise_on_validation

log = logging.getLogger(__name__)


@dataclass
class MAPSettings:
    """Settings of deterministic training.

    Args:
        max_epochs: upper bound on epochs.
        max_time_minutes: wall-clock budget; training stops after the epoch that exceeds it (None: no budget).
        batch_size: frames per batch.
        lr: initial Adam learning rate.
        weight_decay: L2 penalty (Adam's ``weight_decay``), the MAP counterpart of a zero-centred Gaussian prior.
        lr_factor: factor applied to the learning rate when the validation loss stops improving.
        lr_patience: epochs without improvement before the learning rate is reduced.
        min_lr: training stops when the learning rate falls below this.
        patience: early stopping: epochs without validation improvement before training stops.
        checkpoint_seconds: ``last.ckpt`` is written at the end of the first epoch that ends at least this many
            seconds after the previous write, and when training ends: a killed run repeats at most this much
            training when it is resumed (0: every epoch).
        noise_from_validation: after training, set the learned noise stds to their maximum-likelihood values on
            the validation set, the rest of the model fixed
            (:func:`~mlip_uq.inference.noise.fit_noise_on_validation`): trained jointly, they shrink to the training errors, which on small data sets are far below the errors on new
            structures. No effect with ``model.noise: fixed``. In an ensemble (each member's training) and MC
            dropout the noise of all samples is then scaled by one factor fitted with their spread included
            (:func:`~mlip_uq.inference.noise.fit_posterior_noise_on_validation`).
        loss_weights: weights of the energy, forces and stress terms (each a frame's Gaussian NLL of those labels
            with the model's own noise stds, averaged over frames: :func:`~mlip_uq.inference.loss.loss_terms`);
            the validation loss that the schedule, early stopping and the best checkpoint follow is the profile
            likelihood (:func:`~mlip_uq.inference.loss.profile_neg_log_likelihood`) with the same weights.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: Lightning devices (``auto`` or a count).
    """

    max_epochs: int = 100
    max_time_minutes: float | None = None
    batch_size: int = 8
    lr: float = 5e-3
    weight_decay: float = 0.0
    lr_factor: float = 0.5
    lr_patience: int = 10
    min_lr: float = 1e-6
    patience: int = 30
    checkpoint_seconds: float = 60.0
    noise_from_validation: bool = True
    loss_weights: LossWeights = field(default_factory=LossWeights)
    accelerator: str = "auto"
    devices: str | int = "auto"

    def __post_init__(self):
        if not self.checkpoint_seconds >= 0:
            raise ConfigError(f"training.checkpoint_seconds must be >= 0 (0: every epoch), got {self.checkpoint_seconds}")

    @classmethod
    def from_dict(cls, values: Dict) -> "MAPSettings":
        """The settings of a ``training`` section (types checked; ``loss_weights`` a mapping)."""
        values = dict(values or {})
        if isinstance(values.get("loss_weights"), dict):
            values["loss_weights"] = settings_from(LossWeights, values["loss_weights"], "training.loss_weights")
        return settings_from(cls, values, "training")


class PotentialModule(L.LightningModule):
    """Lightning wrapper of a nequip ``GraphModel`` trained on energies, forces and stress."""

    def __init__(self, model: GraphModel, settings: MAPSettings):
        super().__init__()
        self.model = model
        self.settings = settings
        self._sums: Dict[str, Dict[str, torch.Tensor]] = {"train": {}, "val": {}}
        self._frames = {"train": 0, "val": 0}
        self._val_sums: Dict[str, torch.Tensor] = {}

    def forward(self, batch: AtomicDataDict.Type) -> AtomicDataDict.Type:
        return self.model(batch)

    def _step(self, batch: AtomicDataDict.Type, stage: str) -> torch.Tensor:
        out = self.model(batch)
        terms = loss_terms(out, batch)
        loss = weighted_loss(terms, self.settings.loss_weights)
        n_frames = AtomicDataDict.num_frames(batch)
        values = {"energy_mae": terms["energy_mae"], "forces_mae": terms["forces_mae"]}
        if stage == "train":
            values["loss"] = loss
        else:  # val_loss, the monitored one, is computed from these sums at the end of the epoch
            for name, value in squared_error_sums(out, batch).items():
                self._val_sums[name] = self._val_sums.get(name, 0.0) + value
        # the epoch's frame-weighted sums, kept as tensors: no per-step host copy, log call or result bookkeeping
        sums = self._sums[stage]
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value.detach() * n_frames
        self._frames[stage] += n_frames
        return loss

    def on_validation_epoch_start(self):
        self._sums["val"], self._frames["val"], self._val_sums = {}, 0, {}

    def on_validation_epoch_end(self):
        """The epoch's logged metrics, once: ``val_loss``, the validation NLL per frame at the best constant noise
        std of each term (:func:`~mlip_uq.inference.loss.profile_neg_log_likelihood`; the model's learned stds
        overfit with it), the validation MAEs and the means of the epoch's training batches (Lightning validates
        after the epoch's last training batch)."""
        sums, frames = self._val_sums, torch.tensor(float(self._frames["val"]), dtype=torch.float64)
        if self.trainer.world_size > 1:  # every device validated part of the set
            sums = {name: self.all_gather(s).sum(0) for name, s in sums.items()}
            frames = self.all_gather(frames).sum()
        value = profile_neg_log_likelihood(sums, float(frames), self.settings.loss_weights)
        metrics = {"val_loss": torch.tensor(value, dtype=torch.float64)}
        for stage in ("train", "val") if not self.trainer.sanity_checking else ("val",):
            if self._frames[stage]:
                metrics.update({f"{stage}_{name}": total / self._frames[stage] for name, total in self._sums[stage].items()})
        self.log_dict(metrics, prog_bar=True, sync_dist=self.trainer.world_size > 1)
        if not self.trainer.sanity_checking:  # the next epoch's training sums start from zero
            self._sums["train"], self._frames["train"] = {}, 0

    def transfer_batch_to_device(self, batch: AtomicDataDict.Type, device: torch.device, dataloader_idx: int):
        # a flat dict of tensors: moved directly, without Lightning's generic walk over nested collections
        return AtomicDataDict.to_(batch, device)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        # forces are gradients of the energy: validation needs autograd even though Lightning disables it
        with torch.enable_grad():
            return self._step(batch, "val")

    def configure_optimizers(self):
        s = self.settings
        optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=s.lr_factor, patience=s.lr_patience, min_lr=s.min_lr
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}


def _as_is(batch: AtomicDataDict.Type) -> AtomicDataDict.Type:
    return batch


def loaders(train: List[AtomicDataDict.Type], val: List[AtomicDataDict.Type], batch_size: int, seed: int):
    """A shuffled training DataLoader over prepared graphs, and one over the validation batches, collated once
    (their order never changes) and reused every epoch."""
    generator = torch.Generator().manual_seed(seed)
    val_batches = [collate(val[i : i + batch_size]) for i in range(0, len(val), batch_size)]
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator),
        DataLoader(val_batches, batch_size=None, collate_fn=_as_is),
    )


def fit_map(
    model: GraphModel,
    train: List[AtomicDataDict.Type],
    val: List[AtomicDataDict.Type],
    settings: MAPSettings,
    out_dir: Path,
    seed: int = 0,
    resume: bool = False,
) -> Dict[str, torch.Tensor]:
    """Train ``model`` in place and return the state dict with the lowest validation loss.

    Checkpoints go to ``out_dir/checkpoints`` (``last.ckpt`` every ``settings.checkpoint_seconds`` and at the
    end, ``best.ckpt`` the best weights); with ``resume`` training continues from ``last.ckpt`` (optimizer,
    schedule, early-stopping state and epoch included). One row per epoch goes to ``out_dir/logs/metrics.csv``
    (:class:`_MetricsRows`), and its curve to ``out_dir/training_curve.png``. With ``settings.noise_from_validation`` the returned state's noise stds are
    then fitted to the validation set (:func:`~mlip_uq.inference.noise.fit_noise_on_validation`).
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {last}")
    if resume:
        load_checkpoint(last)  # refused by name if it is not weights-only, before Lightning reads it
    module = PotentialModule(model, settings)
    interactive = sys.stderr.isatty()
    # the weights only: what is read from it is the best model, and resuming starts from last.ckpt
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", save_top_k=1,
                           save_weights_only=True, enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=settings.max_epochs,
        max_time=None if settings.max_time_minutes is None else {"minutes": settings.max_time_minutes},
        accelerator=settings.accelerator,
        devices=settings.devices,
        precision="64-true" if next(model.parameters()).dtype == torch.float64 else "32-true",
        callbacks=[
            _MetricsRows(out_dir / "logs" / "metrics.csv"),
            best,
            _LastCheckpoint(last, settings.checkpoint_seconds),
            EarlyStopping(monitor="val_loss", patience=settings.patience),
            _StopAtMinLR(settings.min_lr),
            *([] if interactive else [_EpochLog()]),
        ],
        # a live progress bar on a terminal; one line per epoch in logs and CI
        enable_progress_bar=interactive,
        logger=False,  # the epoch rows are written by _MetricsRows, flushed one by one
        inference_mode=False,
        enable_model_summary=False,
        deterministic=False,
    )
    train_loader, val_loader = loaders(train, val, settings.batch_size, seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        L.seed_everything(seed, verbose=False)
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if resume else None, weights_only=True)
    rows = out_dir / "logs" / "metrics.csv"
    try:
        training_curve_plot(rows, out_dir / "training_curve.png")
    except (FileNotFoundError, ValueError) as error:  # no epoch was run (e.g. a finished run resumed)
        log.warning("no training curve: %s", error)
    state = load_checkpoint(best.best_model_path)["state_dict"]
    state = {name.removeprefix("model."): t for name, t in state.items()}
    if settings.noise_from_validation:
        model.load_state_dict(state)
        fit_noise_on_validation(model, list(val_loader))
        state = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    return state


def training_curves(run_dir: Path, *fits: str) -> Dict[str, Path]:
    """The validation curves (``logs/metrics.csv`` of :func:`fit_map`) of the fits in the folders of ``run_dir``
    that match the glob patterns ``fits`` (``.``: the run folder itself) and have one, by folder relative to
    ``run_dir``: what a method's ``artifacts`` lists (:class:`~mlip_uq.inference.Artifacts`)."""
    run_dir = Path(run_dir)
    curves = {}
    for pattern in fits:
        for path in sorted(run_dir.glob(f"{pattern}/logs/metrics.csv")):
            curves[str(path.parent.parent.relative_to(run_dir))] = path
    return curves


class _MetricsRows(L.Callback):
    """``metrics.csv``: one row per epoch (epoch, optimiser steps so far, the epoch means of the training and
    validation losses and MAEs, the learning rate, the epoch's seconds of training and validation), handed to
    the operating system as it is written; a resumed training appends the rows from the epoch it resumes at
    (:func:`mlip_uq.files.appending_csv`), so the ``seconds`` column sums to the training's cost."""

    FIELDS = ["epoch", "step", "train_loss", "train_energy_mae", "train_forces_mae", "val_loss", "val_energy_mae",
              "val_forces_mae", "lr", "seconds"]

    def __init__(self, path: Path):
        self.path = path
        self._files = contextlib.ExitStack()

    def on_train_start(self, trainer, pl_module):
        self.rows = self._files.enter_context(appending_csv(self.path, self.FIELDS, "epoch", trainer.current_epoch))

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        self.rows.writerow({"epoch": trainer.current_epoch, "step": trainer.global_step,
                            **{k: float(metrics[k]) for k in self.FIELDS[2:-2] if k in metrics},
                            "lr": trainer.optimizers[0].param_groups[0]["lr"],
                            "seconds": round(time.perf_counter() - self._epoch_start, 3)})

    def on_train_end(self, trainer, pl_module):
        self._files.close()

    def on_exception(self, trainer, pl_module, exception):
        self._files.close()


class _LastCheckpoint(Checkpoint):
    """``last.ckpt`` (all that ``--resume`` needs: weights, optimiser, schedule, callbacks, epoch) at the end of
    an epoch, after its validation and metrics row, when ``seconds`` have passed since the last write, and when
    training ends. Written with ``Trainer.save_checkpoint`` (atomically, as Lightning writes its checkpoints)."""

    def __init__(self, path: Path, seconds: float):
        self.path, self.seconds = path, seconds

    def on_train_start(self, trainer, pl_module):
        self._written, self._epoch = time.monotonic(), None

    def _save(self, trainer):
        trainer.save_checkpoint(self.path, weights_only=False)
        self._written, self._epoch = time.monotonic(), trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if time.monotonic() - self._written >= self.seconds:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        if self._epoch != trainer.current_epoch - 1 and trainer.current_epoch > 0:  # not just written
            self._save(trainer)


class _StopAtMinLR(L.Callback):
    """Stop when the plateau schedule has brought the learning rate down to its floor."""

    def __init__(self, min_lr: float):
        self.min_lr = min_lr

    def on_train_epoch_end(self, trainer, pl_module):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if lr <= self.min_lr * (1 + 1e-9):
            trainer.should_stop = True


class _EpochLog(L.Callback):
    """One progress line per epoch: epoch, losses, validation MAEs, learning rate, the seconds of the epoch's
    training batches and of its validation, and the elapsed time."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()
        self.val_seconds = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start = time.perf_counter()
        self.train_seconds = None

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_start = time.perf_counter()
            self.train_seconds = self.val_start - self.epoch_start

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_seconds = time.perf_counter() - self.val_start

    def on_train_epoch_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        now = time.perf_counter()
        if self.train_seconds is None:  # no validation in this epoch
            self.train_seconds, self.val_seconds = now - self.epoch_start, 0.0
        log.info(
            "epoch %d/%d  train_loss %.4g  val_loss %.4g  val_energy_mae %.4g eV/atom  val_forces_mae %.4g eV/Å  "
            "lr %.2g  train %.2f s  val %.2f s  %.0f s",
            trainer.current_epoch + 1, trainer.max_epochs, float(m.get("train_loss", float("nan"))),
            float(m.get("val_loss", float("nan"))), float(m.get("val_energy_mae", float("nan"))),
            float(m.get("val_forces_mae", float("nan"))), lr, self.train_seconds, self.val_seconds,
            now - self.start,
        )
