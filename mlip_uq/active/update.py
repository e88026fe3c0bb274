"""Posterior updates of the active-learning loop: the first fit, then warm starts on the grown training set.

The loop updates the posterior through the method protocol of :mod:`mlip_uq.inference`: a method that can be
updated has the capability :class:`~mlip_uq.inference.UpdatableMethod` (``UpdateSettings``, the ``update``
section, and ``update(context, options, index)``). Today:

- SG-MCMC (:func:`mlip_uq.inference.sgmcmc.update`): the first fit is ``run_sgmcmc``; each update continues
  every chain from its state (``settle_steps`` re-equilibration steps at the target temperature, frozen
  preconditioner, then ``n_samples`` new samples per chain). The training set is the whole labelled set (the
  validation part of the initial set included: sampling has no early stopping).
- Deep ensemble (:func:`mlip_uq.inference.ensemble.update`): the first fit is ``fit_ensemble``; each update
  fine-tunes every member from the previous posterior for at most ``max_epochs`` epochs, or with ``retrain``
  trains every member afresh on the grown set, in ``round<u>/``.

Both are checkpointed by the methods themselves: a killed update is finished by calling :meth:`Updater.fit`
again with the same arguments (``resume=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from nequip.data import AtomicDataDict

from ..config import ConfigError
from ..inference import METHODS, FitContext, UpdatableMethod, is_updatable, load_method
from ..model import ModelConfig

Graphs = List[AtomicDataDict.Type]


def updatable_methods() -> List[str]:
    """The methods of :data:`mlip_uq.inference.METHODS` with the update capability
    (:class:`~mlip_uq.inference.UpdatableMethod`)."""
    return [name for name in METHODS if is_updatable(load_method(name))]


def update_options(method: str, settings: Any, values: Optional[Dict]) -> Any:
    """The ``update`` section parsed by the method's ``UpdateSettings`` (checked when the loop starts).

    Raises:
        ConfigError: the method has no active-learning update, or an option is unknown or mistyped.
    """
    module = load_method(method)
    if not is_updatable(module):
        raise ConfigError(f"active learning updates {' or '.join(updatable_methods())} posteriors; "
                          f"train.method is {method!r}")
    return module.UpdateSettings.from_dict(dict(values or {}), settings)


class Updater:
    """The posterior updates of one loop: method ``method`` in ``work/``.

    Args:
        method: the training method (an entry of :data:`mlip_uq.inference.METHODS` with the update capability).
        config: the model architecture.
        settings: the method's ``Settings``.
        options: the method's ``UpdateSettings`` (:func:`update_options`).
        work: output folder of the method.
        run_config: the resolved training configuration (recorded by methods that keep options as given).
    """

    def __init__(self, method: str, config: ModelConfig, settings: Any, options: Any, work: Path,
                 run_config: Optional[Dict] = None):
        module = load_method(method)
        if not is_updatable(module):
            raise ConfigError(f"method {method!r} has no active-learning update")
        self.module: UpdatableMethod = module
        self.config, self.settings, self.options, self.work = config, settings, options, Path(work)
        self.run_config = dict(run_config or {})

    def fit(self, train: Graphs, val: Graphs, index: int, resume: bool, metadata: Dict) -> Path:
        """Fit (``index`` 0) or update (``index`` ≥ 1) the posterior; returns the posterior file."""
        context = FitContext(model_config=self.config, train=train, val=val, settings=self.settings,
                             out_dir=self.work, config=self.run_config, resume=resume, metadata=metadata)
        return self.module.update(context, self.options, index)
