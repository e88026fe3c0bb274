"""Configuration of an active-learning run (``mlip-uq active CONFIG.yaml``): sections, defaults and structure
sources, read into a frozen :class:`ActiveConfig`; see :mod:`mlip_uq.active.loop` for what each section means.

:func:`load_active_config` is the one place an active-learning configuration is checked: every section is read
into its type (:class:`~mlip_uq.active.oracle.OracleOptions`, :class:`~mlip_uq.active.sources.InitialOptions`,
:class:`~mlip_uq.active.sources.SourceOptions`, :class:`~mlip_uq.active.explore.MDOptions` or
:class:`~mlip_uq.active.explore.PoolOptions`, :class:`~mlip_uq.active.rules.RuleOptions`, :class:`BudgetOptions`,
the method's ``UpdateSettings`` and the :class:`~mlip_uq.config.RunConfig` of ``train``) before any reference
call, and every error is a :class:`~mlip_uq.settings.ConfigError` naming the key, its value and what is expected.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

from ..config import (
    RunConfig,
    apply_override,
    merge_sections,
    read_config_file,
    resolve_config,
    resolve_method_paths,
    resolve_path,
    set_value,
)
from ..settings import ConfigError, check_type, settings_from
from .explore import EXPLORER_OPTIONS, MDOptions, PoolOptions
from .oracle import OracleOptions
from .rules import RuleOptions
from .sources import InitialOptions, SourceOptions, pick_structures
from .update import update_options

__all__ = ["ActiveConfig", "BudgetOptions", "load_active_config", "pick_structures"]

SECTIONS = {"name", "seed", "oracle", "initial", "test", "explore", "rule", "budget", "update", "train"}
DEFAULTS: Dict = {
    "name": "active",
    "seed": 0,
    "initial": {"path": None, "index": ":", "n": None, "max_atoms": None, "labels": "oracle"},
    "test": None,
    "budget": {"max_calls": 20, "target_forces_mae": None},
    "update": {},
    "train": {"method": "sgmcmc"},
}
#: the options of each explorer kind with their defaults (:class:`~mlip_uq.active.explore.MDOptions`,
#: :class:`~mlip_uq.active.explore.PoolOptions`)
EXPLORE_DEFAULTS = {kind: dataclasses.asdict(options()) for kind, options in EXPLORER_OPTIONS.items()}
#: the labelled initial set in the run folder: the ``data.path`` of the loop's training configuration
INITIAL_SET = "initial.extxyz"


@dataclass(frozen=True)
class BudgetOptions:
    """The ``budget`` section: when the loop stops (a resumed run may change it).

    Args:
        max_calls: reference calls during exploration; None: no limit.
        target_forces_mae: stop once the test forces MAE is at most this (eV/Å); None: no target.
    """

    max_calls: Optional[int] = 20
    target_forces_mae: Optional[float] = None


@dataclass(frozen=True)
class ActiveConfig:
    """A checked active-learning configuration (:func:`load_active_config`).

    Attributes:
        name: the run's name (default folder ``runs/<name>``).
        seed: the loop's seed (structure draws, MD velocities and thermostats, a random rule, the training's
            seed unless ``train.seed``).
        oracle: the reference calculator.
        initial: the starting structures.
        test: structures labelled once and evaluated after every update; None: no test set.
        explore: the explorer's options, :class:`~mlip_uq.active.explore.MDOptions` (``starts.path`` filled in
            with the initial set's file) or :class:`~mlip_uq.active.explore.PoolOptions`.
        rule: when to call the oracle.
        budget: when to stop.
        update: the training method's ``UpdateSettings`` (the ``update`` section).
        train: the training configuration of the loop's posterior; its ``data.path`` is :data:`INITIAL_SET`, a
            file of the run folder (:meth:`train_config` gives it with the folder).
    """

    name: str
    seed: int
    oracle: OracleOptions
    initial: InitialOptions
    test: Optional[SourceOptions]
    explore: Union[MDOptions, PoolOptions]
    rule: RuleOptions
    budget: BudgetOptions
    update: Any
    train: RunConfig
    _values: Dict[str, Any] = field(repr=False, compare=False)

    @property
    def kind(self) -> str:
        """The explorer's kind: ``md`` or ``pool``."""
        return "md" if isinstance(self.explore, MDOptions) else "pool"

    def to_dict(self) -> Dict[str, Any]:
        """The resolved configuration as a mapping (a copy): what ``active_config.yaml`` records."""
        return copy.deepcopy(self._values)

    def with_values(self, values: Mapping[str, Any]) -> "ActiveConfig":
        """A copy with the dotted keys of ``values`` set (``{"budget.max_calls": 0, "train.sgmcmc.lr": 1e-3}``; a
        section name replaces the section), checked again by :func:`load_active_config`."""
        config = self.to_dict()
        for key, value in values.items():
            set_value(config, key, copy.deepcopy(value))
        return load_active_config(config)

    def train_config(self, out: Path, type_names: Optional[Sequence[str]] = None) -> RunConfig:
        """The training configuration of the loop in ``out``: :attr:`train` with ``data.path`` the labelled initial
        set ``out/initial.extxyz`` and, when given, the element names ``type_names`` (in type-index order)."""
        values: Dict[str, Any] = {"data.path": str(Path(out) / INITIAL_SET)}
        if type_names is not None:
            values["model.type_names"] = list(type_names)
        return self.train.with_values(values)


def load_active_config(source, overrides: Iterable[str] = ()) -> ActiveConfig:
    """Read an active-learning configuration (a YAML file, a dict or an :class:`ActiveConfig`), fill defaults,
    apply ``key=value`` overrides, resolve relative paths against the configuration's folder and check every
    section.

    Raises:
        ConfigError: unknown section or option, missing ``oracle``/``initial.path``/``rule``/``explore``, a
            value of the wrong type (named with its key and what is expected), bad override.
    """
    raw, base = read_config_file(source)
    for override in overrides:
        apply_override(raw, override, sections=SECTIONS)
    unknown = set(raw) - SECTIONS
    if unknown:
        raise ConfigError(f"unknown active-learning section(s) {sorted(unknown)}; known: {sorted(SECTIONS)}")
    for needed in ("oracle", "rule", "explore"):
        if not isinstance(raw.get(needed), dict):
            raise ConfigError(f"section {needed!r} is required (see configs/active_*.yaml)")
    cfg = merge_sections(DEFAULTS, {k: v for k, v in raw.items() if k not in ("rule", "oracle", "update", "explore")})
    check_type(cfg["name"], str, "name")
    check_type(cfg["seed"], int, "seed")
    cfg["oracle"], cfg["rule"], cfg["update"] = dict(raw["oracle"]), dict(raw["rule"]), dict(raw.get("update") or {})
    kind = raw["explore"].get("kind", "md")
    if kind not in EXPLORE_DEFAULTS:
        raise ConfigError(f"explore.kind {kind!r} unknown; use md or pool")
    cfg["explore"] = {"kind": kind, **merge_sections(EXPLORE_DEFAULTS[kind],
                                                     {k: v for k, v in raw["explore"].items() if k != "kind"})}
    explore = cfg["explore"]
    for source in (cfg["test"], explore.get("starts"), explore.get("pool"), cfg["initial"]):
        if isinstance(source, dict) and isinstance(source.get("path"), str) and source["path"]:
            source["path"] = str(resolve_path(source["path"], base))
    if not isinstance(cfg["train"], dict):
        raise ConfigError(f"train={cfg['train']!r}: expected a mapping of sections")
    if isinstance(cfg["train"].get("data"), dict) and "path" in cfg["train"]["data"]:
        raise ConfigError("train.data.path is filled in by the loop (the labelled initial set); leave it out")
    train = _train(cfg, base)
    resolve_method_paths(cfg["train"], base)  # recorded as given, with the method's path options resolved
    return _typed(cfg, train)


def _train(cfg: Dict, base: Path) -> RunConfig:
    """The checked training configuration of ``cfg["train"]``: a random split without test part by default, the
    loop's seed, ``data.path`` :data:`INITIAL_SET`; paths resolved against ``base``. Errors are named
    ``train: ...``."""
    train = copy.deepcopy(cfg["train"])
    data = train.setdefault("data", {})
    if isinstance(data, dict):
        data["path"] = INITIAL_SET
        data.setdefault("split", {"kind": "random", "val_fraction": 0.1, "test_fraction": 0.0})
        if isinstance(data["split"], dict):
            data["split"].setdefault("test_fraction", 0.0)
    train.setdefault("seed", cfg["seed"])
    train.setdefault("model", {})
    try:
        resolved = resolve_config(train, base)
        resolved["data"]["path"] = INITIAL_SET  # relative: a file of the run folder (ActiveConfig.train_config)
        return RunConfig.from_dict(resolved)
    except ConfigError as error:
        raise ConfigError(f"train: {error}") from error


def _typed(cfg: Dict, train: RunConfig) -> ActiveConfig:
    """The :class:`ActiveConfig` of a resolved mapping."""
    oracle = OracleOptions.from_dict(cfg["oracle"])
    initial = settings_from(InitialOptions, cfg["initial"], "initial")
    if not initial.path:
        raise ConfigError("initial.path is required (the structures of the starting training set)")
    test = None if cfg["test"] is None else settings_from(SourceOptions, cfg["test"], "test")
    if test is not None and not test.path:
        raise ConfigError("test.path is required (the structures of the test set), or leave out the test section")
    explore_values = {k: v for k, v in cfg["explore"].items() if k != "kind"}
    kind = cfg["explore"]["kind"]
    explore = settings_from(EXPLORER_OPTIONS[kind], explore_values, "explore", kind=kind)
    if isinstance(explore, MDOptions) and not explore.starts.path:
        explore = dataclasses.replace(explore, starts=dataclasses.replace(explore.starts, path=initial.path))
    if isinstance(explore, PoolOptions) and not explore.pool.path:
        raise ConfigError("explore.pool.path is required with explore.kind pool")
    rule = RuleOptions.from_dict(cfg["rule"])
    budget = settings_from(BudgetOptions, cfg["budget"], "budget")
    update = update_options(train.method, train.settings, cfg["update"])
    return ActiveConfig(cfg["name"], cfg["seed"], oracle, initial, test, explore, rule, budget, update, train,
                        copy.deepcopy(cfg))
