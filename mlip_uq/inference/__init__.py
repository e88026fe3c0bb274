"""Training methods behind one protocol, and the table that lists them.

A method is a module (or any object) that implements :class:`MethodModule`:

- ``Settings``: a dataclass of its typed options (:class:`MethodSettings`); ``Settings.from_dict(config)`` builds
  it from a run configuration (the sections of its :data:`METHODS` entry), parses the nested ``prior`` /
  ``stochastic`` options into their types, checks every value's type (errors name the key, its value and what is
  expected) and the cross-section rules (e.g. ``model.dropout`` only with a method that trains with dropout);
  the class attribute ``Settings.PATHS`` names the options that are file paths (dotted, from the
  configuration's root), which :func:`mlip_uq.config.load_config` resolves against the configuration's folder;
- ``fit(context: FitContext) -> Posterior``: trains on ``context.train`` / ``context.val`` and always writes
  ``context.out_dir / "posterior.h5"``; with ``context.resume`` it continues from its checkpoints;
- ``artifacts(out_dir) -> Artifacts``: what a run folder of the method holds for the tools that read runs
  (``mlip-uq compare``): its posterior file and the validation curves of its MAP-trainer fits, so that no tool
  knows a method's folder layout;
- ``map_start(config, map_config) -> MapStart | None``: whether, and how, a run of configuration ``config``
  takes a finished MAP run of configuration ``map_config`` (the same data) for the MAP model it would
  otherwise train itself; ``mlip-uq compare`` then trains one MAP run per split for every method that does;
- optionally the capability :class:`UpdatableMethod`: ``UpdateSettings`` (``UpdateSettings.from_dict(values,
  settings)``: the active-learning ``update`` section) and ``update(context, options, index) -> Path``: the
  ``index``-th fit of an active-learning loop (0: the first, then warm starts on the grown training set),
  returning the posterior file it wrote. Whether a method has it is ``isinstance(module, UpdatableMethod)``.

``init`` means the same in every method that has it: ``null`` a fresh initialisation from the run's seed,
``map`` a MAP model trained first in the run with the ``training`` section (:data:`mlip_uq.config.FROM_MAP`),
a path the weights of that file; ``prior.center: map`` centres the prior on that MAP model.

:data:`METHODS` drives the configuration sections (:mod:`mlip_uq.config`), ``mlip-uq train``
(:func:`mlip_uq.train.train`), ``mlip-uq compare`` (:mod:`mlip_uq.compare`) and the active-learning updates
(:mod:`mlip_uq.active.update`): adding a method is one module and one entry, or, from outside the package, one
call of :func:`register_method`. Modules are imported on first use, so that reading a configuration stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ClassVar,
    Dict,
    Generic,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Type,
    TypedDict,
    TypeGuard,
    TypeVar,
    Union,
    runtime_checkable,
)

if TYPE_CHECKING:  # torch and nequip: not imported with the method table
    from nequip.data import AtomicDataDict

    from ..model import ModelConfig
    from ..posterior import Posterior

    Graph = AtomicDataDict.Type


class MethodSettings(Protocol):
    """The ``Settings`` of a method: a dataclass built from a run configuration."""

    PATHS: ClassVar[Tuple[str, ...]]

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "MethodSettings": ...


S = TypeVar("S")


class PosteriorMetadata(TypedDict, total=False):
    """What a method passes on to its :class:`~mlip_uq.posterior.Posterior` besides the samples."""

    energy_references: Dict[str, float]
    data_fingerprint: str


@dataclass
class FitContext(Generic[S]):
    """What a method's ``fit`` (and ``update``) is given; ``S`` is the method's ``Settings``.

    Attributes:
        model_config: the architecture (dataset statistics filled in).
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

    model_config: ModelConfig
    train: List[Graph]
    val: List[Graph]
    settings: S
    out_dir: Path
    config: Dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    metadata: PosteriorMetadata = field(default_factory=dict)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)

    @property
    def posterior_path(self) -> Path:
        return self.out_dir / "posterior.h5"


@dataclass(frozen=True)
class Artifacts:
    """What a run folder of a method holds for the tools that read runs (``method.artifacts(out_dir)``).

    Attributes:
        posterior: the posterior file.
        curves: the validation curves (``metrics.csv`` of :func:`~mlip_uq.inference.trainer.fit_map`) of the
            run's MAP-trainer fits that exist, by the fit's folder relative to the run folder (``.``: the run's
            own fit, e.g. method ``map``; ``members/0``, ``map``, ...).
    """

    posterior: Path
    curves: Dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class MapStart:
    """How a run takes a finished MAP run for the MAP model it would train itself (``method.map_start``).

    Attributes:
        options: dotted keys of the run configuration (``sgmcmc.init``, ``vi.prior.center``) to be set to the
            MAP run's posterior file before the run is trained.
        plant: ``plant(map_run, out_dir)`` puts the finished MAP run (its :class:`Artifacts`) into the empty run
            folder ``out_dir`` as a finished part of the run (an ensemble's member 0), which is then trained with
            ``resume``; None: nothing is planted.
    """

    options: Tuple[str, ...] = ()
    plant: Optional[Callable[[Artifacts, Path], None]] = None


@runtime_checkable
class MethodModule(Protocol):
    """A training method: the names its module exports (see the module docstring)."""

    Settings: Type[MethodSettings]

    def fit(self, context: FitContext[Any]) -> Posterior: ...

    def artifacts(self, out_dir: Path) -> Artifacts: ...

    def map_start(self, config: Mapping[str, Any], map_config: Mapping[str, Any]) -> Optional[MapStart]: ...


@runtime_checkable
class UpdatableMethod(MethodModule, Protocol):
    """A method whose posterior an active-learning loop updates (:mod:`mlip_uq.active.update`)."""

    UpdateSettings: Type[Any]

    def update(self, context: FitContext[Any], options: Any, index: int) -> Path: ...


_PROTOCOL = ("Settings", "fit", "artifacts", "map_start")


def check_method(module: Any, name: str) -> MethodModule:
    """``module``, checked to implement :class:`MethodModule`.

    Raises:
        TypeError: a name of the protocol is missing (named in the error).
    """
    if not isinstance(module, MethodModule):
        missing = [n for n in _PROTOCOL if not hasattr(module, n)]
        raise TypeError(f"method {name!r} ({getattr(module, '__name__', module)!r}) does not implement the method "
                        f"protocol (mlip_uq.inference.MethodModule): it has no {', '.join(missing)}")
    return module


@dataclass(frozen=True)
class Method:
    """One entry of the method table.

    Attributes:
        module: import path of the module that implements the protocol (imported on first use), or the module
            (any object implementing :class:`MethodModule`) itself.
        sections: the run-configuration sections its ``Settings.from_dict`` reads.
    """

    module: Union[str, Any]
    sections: Tuple[str, ...]

    def load(self) -> MethodModule:
        module = importlib.import_module(self.module) if isinstance(self.module, str) else self.module
        return check_method(module, str(getattr(module, "__name__", self.module)))


METHODS: Dict[str, Method] = {
    "map": Method("mlip_uq.inference.map", ("training",)),
    "sgmcmc": Method("mlip_uq.inference.sgmcmc", ("sgmcmc", "training")),
    "vi": Method("mlip_uq.inference.vi", ("vi", "training")),
    "ensemble": Method("mlip_uq.inference.ensemble", ("ensemble", "training")),
    "dropout": Method("mlip_uq.inference.dropout", ("dropout", "training")),
}


def register_method(name: str, module: Union[str, Any], sections: Sequence[str], replace: bool = False) -> Method:
    """Add method ``name`` to :data:`METHODS` from outside the package (``del METHODS[name]`` removes it).

    Args:
        name: the value of a run configuration's ``method``.
        module: the import path of its module, or the module (any object implementing :class:`MethodModule`).
        sections: the configuration sections its ``Settings.from_dict`` reads (e.g. its own and ``training``).
        replace: replace a method of the same name.

    Raises:
        ValueError: ``name`` is in the table already (and not ``replace``).
        TypeError: ``module`` is an object that does not implement the protocol (an import path is checked
            when the module is first loaded).
    """
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} is registered already ({METHODS[name].module}); pass replace=True")
    if not isinstance(module, str):
        check_method(module, name)
    METHODS[name] = Method(module, tuple(sections))
    return METHODS[name]


def method_sections() -> Tuple[str, ...]:
    """Every configuration section some method reads, in table order."""
    return tuple(dict.fromkeys(s for m in METHODS.values() for s in m.sections))


def load_method(name: str) -> MethodModule:
    """The module of method ``name``.

    Raises:
        ValueError: ``name`` is not in :data:`METHODS`.
        TypeError: its module does not implement :class:`MethodModule`.
    """
    if name not in METHODS:
        raise ValueError(f"method {name!r} is not available; available: {list(METHODS)}")
    return METHODS[name].load()


def is_updatable(module: MethodModule) -> TypeGuard[UpdatableMethod]:
    """Whether a method has the active-learning update capability (:class:`UpdatableMethod`)."""
    return isinstance(module, UpdatableMethod)


def trains_map_alike(config: Mapping[str, Any], map_config: Mapping[str, Any]) -> bool:
    """Whether a MAP fit in a run of configuration ``config`` would be the MAP run ``map_config``'s: the sections
    a MAP fit reads (``seed``, ``data``, ``model``, ``training``) are equal (for a ``map_start``)."""
    return all(config.get(key) == map_config.get(key) for key in ("seed", "data", "model", "training"))
