"""Posterior updates of the active-learning loop: the first fit, then warm starts on the grown training set.

- SG-MCMC (:class:`SGMCMCUpdate`): the first fit is :func:`~mlip_uq.inference.sampling.run_sgmcmc`; each
  update continues every chain from its state with :func:`~mlip_uq.inference.sampling.continue_sgmcmc`
  (``settle_steps`` re-equilibration steps at the target temperature, frozen preconditioner, then
  ``n_samples`` new samples per chain). The training set is the whole labelled set (the validation part of the
  initial set included: sampling has no early stopping).
- Deep ensemble (:class:`EnsembleUpdate`): the first fit is
  :func:`~mlip_uq.inference.ensemble.fit_ensemble`; each update fine-tunes every member from the previous
  posterior (``init``) for at most ``max_epochs`` epochs, in its own folder ``round<u>``.

Both are checkpointed by the methods themselves: a killed update is finished by calling :meth:`fit` again with
the same arguments (``resume=True``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional

from nequip.data import AtomicDataDict

from ..inference.ensemble import EnsembleSettings, fit_ensemble
from ..inference.sampling import SGMCMCSettings, continue_sgmcmc, run_sgmcmc
from ..model import ModelConfig
from ..posterior import load_posterior

Graphs = List[AtomicDataDict.Type]


class SGMCMCUpdate:
    """SG-MCMC posterior in ``work/`` (``work/posterior.h5``), continued chain by chain.

    Args:
        config: the model architecture.
        settings: the sampler's settings (the training configuration's ``sgmcmc`` section).
        update: ``{settle_steps: int, n_samples: int}``; defaults 200 and ``settings.n_samples``.
        work: output folder of the sampler.
    """

    def __init__(self, config: ModelConfig, settings: SGMCMCSettings, update: Dict, work: Path):
        self.config, self.work, self.settings = config, Path(work), settings
        options = dict(update)
        self.settle_steps = int(options.pop("settle_steps", 200))
        self.n_samples = int(options.pop("n_samples", self.settings.n_samples))
        if options:
            raise ValueError(f"unknown update option(s) {sorted(options)} for sgmcmc; known: settle_steps, n_samples")

    def fit(self, train: Graphs, val: Graphs, index: int, resume: bool, metadata: Dict) -> Path:
        """Fit (``index`` 0) or update (``index`` ≥ 1) on ``train + val``; returns the posterior file."""
        graphs = list(train) + list(val)
        if index == 0:
            run_sgmcmc(self.config, graphs, self.settings, self.work, resume=resume, metadata=metadata)
        else:
            continue_sgmcmc(self.config, graphs, self.settings, self.work, n_steps=self.settle_steps,
                            n_samples=self.n_samples, metadata=metadata)
        return self.work / "posterior.h5"


class EnsembleUpdate:
    """Deep ensemble, refitted in ``work/round<u>/`` with the previous round's members as starting points.

    Args:
        config: the model architecture.
        settings: the ensemble's settings (the training configuration's ``ensemble`` and ``training``).
        update: ``{max_epochs: int}``, the fine-tuning epochs per member (default ``training.max_epochs``).
        work: output folder.
    """

    def __init__(self, config: ModelConfig, settings: EnsembleSettings, update: Dict, work: Path):
        self.config, self.work, self.settings = config, Path(work), settings
        options = dict(update)
        max_epochs = int(options.pop("max_epochs", settings.training.max_epochs))
        if options:
            raise ValueError(f"unknown update option(s) {sorted(options)} for ensemble; known: max_epochs")
        self.fine_tune = dataclasses.replace(settings, training=dataclasses.replace(settings.training,
                                                                                    max_epochs=max_epochs))

    def path(self, index: int) -> Path:
        return self.work / f"round{index:03d}" / "posterior.h5"

    def fit(self, train: Graphs, val: Graphs, index: int, resume: bool, metadata: Dict) -> Path:
        """Fit (``index`` 0) or fine-tune from round ``index - 1`` (``index`` ≥ 1); returns the posterior file."""
        init = load_posterior(self.path(index - 1)) if index > 0 else None
        settings = self.settings if index == 0 else self.fine_tune
        posterior = fit_ensemble(self.config, train, val, settings, self.path(index).parent, resume=resume,
                                 init=init, metadata=metadata)
        posterior.save(self.path(index))
        return self.path(index)


def make_update(method: str, config: ModelConfig, settings: Dict, update: Optional[Dict], work: Path):
    """The updater of a training method: ``sgmcmc`` or ``ensemble``, with ``settings`` as
    :func:`mlip_uq.train.method_settings` returns them."""
    if method == "sgmcmc":
        return SGMCMCUpdate(config, settings["sgmcmc"], dict(update or {}), work)
    if method == "ensemble":
        return EnsembleUpdate(config, settings["ensemble"], dict(update or {}), work)
    raise ValueError(f"active learning updates sgmcmc or ensemble posteriors; train.method is {method!r}")
