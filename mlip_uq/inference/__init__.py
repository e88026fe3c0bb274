"""Training methods behind one protocol, and the table that lists them.

A method is a module with

- ``Settings``: a dataclass of its typed options; ``Settings.from_dict(config)`` builds it from a run
  configuration (the sections of :data:`METHODS`), parses the nested ``prior`` / ``stochastic`` options
  into their types, checks every value's type (errors name the key, its value and what is expected) and the
  cross-section rules (e.g. ``model.dropout`` only with a method that trains with dropout); the class attribute
  ``Settings.PATHS`` names the options that are file paths (dotted, from the configuration's root), which
  :func:`mlip_uq.config.load_config` resolves against the configuration's folder;
- ``fit(context: FitContext) -> Posterior``: trains on ``context.train`` / ``context.val`` and always writes
  ``context.out_dir / "posterior.h5"``; with ``context.resume`` it continues from its checkpoints;
- optionally ``UpdateSettings`` (``UpdateSettings.from_dict(values, settings)``: the active-learning ``update``
  section) and ``update(context, options, index) -> Path``: the ``index``-th fit of an active-learning loop
  (0: the first, then warm starts on the grown training set), returning the posterior file it wrote.

:data:`METHODS` drives the configuration sections (:mod:`mlip_uq.config`), ``mlip-uq train``
(:func:`mlip_uq.train.train`) and the active-learning updates (:mod:`mlip_uq.active.update`): adding a method
is one module and one entry. Modules are imported on first use, so that reading a configuration stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Tuple


@dataclass(frozen=True)
class Method:
    """One entry of the method table.

    Attributes:
        module: import path of the module that implements the protocol (``Settings``, ``fit``, ``update``).
        sections: the run-configuration sections its ``Settings.from_dict`` reads.
    """

    module: str
    sections: Tuple[str, ...]

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


METHODS: Dict[str, Method] = {
    "map": Method("mlip_uq.inference.map", ("training",)),
    "sgmcmc": Method("mlip_uq.inference.sgmcmc", ("sgmcmc", "training")),
    "vi": Method("mlip_uq.inference.vi", ("vi", "training")),
    "ensemble": Method("mlip_uq.inference.ensemble", ("ensemble", "training")),
    "dropout": Method("mlip_uq.inference.dropout", ("dropout", "training")),
}


def method_sections() -> Tuple[str, ...]:
    """Every configuration section some method reads, in table order."""
    return tuple(dict.fromkeys(s for m in METHODS.values() for s in m.sections))


def load_method(name: str) -> ModuleType:
    """The module of method ``name``.

    Raises:
        ValueError: ``name`` is not in :data:`METHODS`.
    """
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not available; available: {list(METHODS)}")
    return METHODS[name].load()


@dataclass
class FitContext:
    """What a method's ``fit`` (and ``update``) is given.

    Attributes:
        model_config: the architecture (a :class:`~mlip_uq.model.ModelConfig`, dataset statistics filled in).
        train: training graphs.
        val: validation graphs (early stopping of MAP training; sampling methods may ignore them).
        settings: the method's ``Settings``.
        out_dir: the run folder; ``posterior.h5`` and the method's checkpoints go here.
        config: the resolved run configuration (recorded in the posterior's hyperparameters where a method
            keeps the options as given).
        resume: continue from the checkpoints in ``out_dir``.
        metadata: passed to the :class:`~mlip_uq.posterior.Posterior` (``energy_references``,
            ``data_fingerprint``).
    """

    model_config: Any
    train: List[Any]
    val: List[Any]
    settings: Any
    out_dir: Path
    config: Dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    metadata: Dict[str, Any] = field(default_factory=dict)

    @property
    def posterior_path(self) -> Path:
        return Path(self.out_dir) / "posterior.h5"
