"""Run configurations: YAML files plus ``key=value`` overrides on the command line, read into a frozen
:class:`RunConfig`.

A configuration has the top-level sections ``name``, ``method``, ``seed``, ``data``, ``model``, ``evaluate``
and one or more sections per training method (``training``, ``sgmcmc``, ``vi``, ``ensemble``, ``dropout``: the
sections of :data:`mlip_uq.inference.METHODS`); see ``configs/*.yaml`` for documented examples. Relative paths
(data files, store, and the options a method's ``Settings.PATHS`` names, such as pre-trained weights) are
resolved against the folder of the configuration file; ``dataset:NAME/FILE`` names a file of a public data set
fetched into the cache by ``mlip-uq data fetch NAME`` (:mod:`mlip_uq.datasets`).

:func:`load_config` is the one place a run configuration is checked: every section is read into its type
(:class:`DataConfig` with one split type per ``data.split.kind``, :class:`ModelSection`,
:class:`EvaluateOptions`, the method's ``Settings``) by :func:`mlip_uq.settings.settings_from`, so every error is
a :class:`~mlip_uq.settings.ConfigError` that names the key, its value and what is expected, raised before any
data are read. The code that runs a configuration reads the attributes of the :class:`RunConfig`;
:meth:`RunConfig.to_dict` gives the resolved mapping where one is written (``config.yaml``, a posterior's
hyperparameters).

Which sections a method reads:

- ``map``: ``training`` (:class:`~mlip_uq.inference.trainer.MAPSettings`).
- ``sgmcmc``: ``sgmcmc`` (:class:`~mlip_uq.inference.sgmcmc.SGMCMCSettings`), and ``training`` for the MAP
  phase that the chains start from when ``sgmcmc.init`` or ``sgmcmc.prior.center`` is ``map``.
- ``ensemble``: ``ensemble`` (``n_members``, ``bootstrap``; :class:`~mlip_uq.inference.ensemble.EnsembleSettings`)
  and ``training`` for every member.
- ``vi``: ``vi`` (:class:`~mlip_uq.inference.vi.VISettings`; ``stochastic``, ``prior`` and ``noise`` shaped as in
  ``sgmcmc``), and ``training`` for the MAP phase when ``vi.init`` or ``vi.prior.center`` is ``map``.
- ``dropout``: ``training`` (MAP training with dropout active; the rate is ``model.dropout``) and ``dropout``
  (``n_samples``, ``seed``; :class:`~mlip_uq.inference.dropout.DropoutSettings`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .data import LabelKeys
from .data.splits import SPLITS, Split
from .datasets import dataset_path, is_dataset_path
from .files import atomic_write
from .inference import METHODS, load_method, method_sections
from .model import ModelConfig
from .settings import FROM_MAP, ConfigError, check_type, section_mapping, settings_from

# ConfigError, FROM_MAP, check_type and settings_from are re-exported from mlip_uq.settings (their one home)
__all__ = ["ConfigError", "DataConfig", "EvaluateOptions", "FROM_MAP", "FilterOptions", "ModelSection", "RunConfig",
           "apply_override", "check_resumed_config", "check_type", "dump_config", "load_config", "read_config_file",
           "resolve_config", "resolve_method_paths", "resolve_path", "set_value", "settings_from"]

#: sections of every run configuration; the methods' sections come from :data:`mlip_uq.inference.METHODS`
BASE_SECTIONS = ("name", "method", "seed", "data", "model", "evaluate")

BASE_DEFAULTS: Dict[str, Any] = {
    "method": "map",
    "seed": 0,
    "data": {
        "path": None,
        "test_path": None,
        "keys": {"energy": "energy", "forces": "forces", "stress": "stress"},
        "energy_references": "fit",
        "filter": {"max_energy_per_atom": None, "max_force": None},
        "split": {"kind": "random", "val_fraction": 0.1, "test_fraction": 0.1},
        "n_train": None,
        "n_val": None,
        "n_test": None,
        "min_distance": 0.5,
        "store": None,
    },
    "model": {},
    "evaluate": {"batch_size": 16},
}


def training_sections() -> set:
    """The sections of a training configuration: :data:`BASE_SECTIONS` and every method's."""
    return {*BASE_SECTIONS, *method_sections()}


def defaults() -> Dict[str, Any]:
    """The default configuration: :data:`BASE_DEFAULTS` with an empty section per method section before
    ``evaluate``."""
    out = {k: copy.deepcopy(v) for k, v in BASE_DEFAULTS.items() if k != "evaluate"}
    out.update({s: {} for s in method_sections()})
    out["evaluate"] = copy.deepcopy(BASE_DEFAULTS["evaluate"])
    return out


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats, so that ``1e-4`` is a number, not the string '1e-4'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def merge_sections(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_sections(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(config: Dict[str, Any], override: str, sections: Optional[Iterable[str]] = None) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``5``, ``1e-3``, ``[a, b]``).
    The first key must be one of ``sections`` (default: those of a training configuration,
    :func:`training_sections`).

    Example:
        >>> config = {"training": {"lr": 0.01}}
        >>> apply_override(config, "training.loss_weights.forces=10")
        >>> config
        {'training': {'lr': 0.01, 'loss_weights': {'forces': 10}}}
    """
    sections = training_sections() if sections is None else set(sections)
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. training.max_epochs=5)")
    key, raw = override.split("=", 1)
    key = key.strip()
    if key.split(".")[0] not in sections:
        raise ConfigError(f"override {override!r}: unknown section {key.split('.')[0]!r}; sections: {sorted(sections)}")
    set_value(config, key, parse_yaml(raw), f"override {override!r}")


def set_value(config: Dict[str, Any], dotted: str, value: Any, what: Optional[str] = None) -> None:
    """Set the dotted key ``dotted`` (``sgmcmc.prior.center``) of a configuration mapping in place, making the
    sections on the way; ``what`` names the change in errors (default: the key).

    Raises:
        ConfigError: a key on the way holds a value, not a section.
    """
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what or dotted}: {part!r} is not a section")
    node[last] = value


def read_config_file(source) -> Tuple[Dict[str, Any], Path]:
    """A configuration as a mapping (``source``: a YAML file, a dict, copied, or a typed configuration, its
    :meth:`~RunConfig.to_dict`) and the folder its relative paths are resolved against (the file's, or the
    working directory otherwise)."""
    if hasattr(source, "to_dict"):
        return source.to_dict(), Path.cwd()
    if isinstance(source, dict):
        return copy.deepcopy(source), Path.cwd()
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"configuration file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"configuration file {path} must hold a mapping of sections")
    return raw, path.resolve().parent


def load_config(source, overrides: Iterable[str] = ()) -> "RunConfig":
    """Read a run configuration (a YAML file, a dict or a :class:`RunConfig`), fill defaults, apply overrides,
    resolve paths and check every section (types, names, the method's rules across sections), before any data
    are read.

    Raises:
        ConfigError: an unknown section or option, a missing ``data.path``, a bad override, or a value of the
            wrong type (the error names the key, its value and what is expected).
    """
    raw, base_dir = read_config_file(source)
    return RunConfig.from_dict(resolve_config(raw, base_dir, overrides))


def resolve_config(raw: Dict[str, Any], base_dir: Path, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """The resolved mapping of a run configuration ``raw`` (not modified): defaults filled in, ``overrides``
    applied, the method named and ``data.path`` given, relative paths resolved against ``base_dir``; what
    :meth:`RunConfig.from_dict` reads.

    Raises:
        ConfigError: an unknown section or method, no ``data.path``, a bad override.
    """
    raw = copy.deepcopy(raw)
    known = training_sections()
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown configuration section(s) {sorted(unknown)}; known: {sorted(known)}")
    config = merge_sections(defaults(), raw)
    if isinstance(raw.get("data"), dict) and "split" in raw["data"]:  # a split is taken whole: another kind has
        config["data"]["split"] = copy.deepcopy(raw["data"]["split"])  # other options than the default's
    for override in overrides:
        apply_override(config, override)
    if config["method"] not in METHODS:
        raise ConfigError(f"method {config['method']!r} is not available; available: {list(METHODS)}")
    data = config["data"]
    if not isinstance(data, dict) or not data.get("path"):
        raise ConfigError("data.path is required (the file of labelled structures to train on)")
    for key in ("path", "test_path", "store"):
        if isinstance(data.get(key), str) and data[key]:
            data[key] = str(resolve_path(data[key], base_dir))
    resolve_method_paths(config, base_dir)
    return config


def resolve_method_paths(config: Dict[str, Any], base_dir: Path) -> None:
    """Resolve, in place, the path options (``Settings.PATHS``) of every method whose sections ``config`` fills
    in, against ``base_dir``; only those methods' modules are imported. Values that are not strings, and
    :data:`FROM_MAP` (the run's own MAP model), are left to the settings."""
    for method in METHODS.values():
        if not any(config.get(s) for s in method.sections):
            continue
        for dotted in method.load().Settings.PATHS:
            *parents, last = dotted.split(".")
            node = config
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and isinstance(node.get(last), str) and node[last] not in ("", FROM_MAP):
                node[last] = str(resolve_path(node[last], base_dir))  # a mistyped value is reported later


def resolve_path(path: str, base_dir: Path) -> Path:
    """``path`` (``~`` expanded) relative to ``base_dir`` unless it is absolute; ``dataset:NAME/FILE`` names a
    file of a registered public data set in the cache (:func:`mlip_uq.datasets.dataset_path`).

    Raises:
        mlip_uq.datasets.DatasetNotFetchedError: a ``dataset:`` path whose data set is not in the cache (the
            message names ``mlip-uq data fetch NAME``).
        mlip_uq.datasets.DatasetError: a ``dataset:`` path of an unknown data set or file.
    """
    if is_dataset_path(path):
        return dataset_path(path)
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def dump_config(config, path: Optional[Path]) -> str:
    """``config`` (a mapping, or a typed configuration: its ``to_dict()``) as YAML (key order kept), written
    atomically to ``path`` unless it is None."""
    text = yaml.safe_dump(config.to_dict() if hasattr(config, "to_dict") else config, sort_keys=False)
    if path is not None:
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    return text


def check_resumed_config(saved: Path, config, load: Callable, may_change: Sequence[str], what: str,
                         allowed: Optional[str] = None) -> None:
    """Check that a resumed run's configuration is the one it started with (``saved``, a YAML file written by
    :func:`dump_config`), but for the dotted keys ``may_change``. Both are compared as ``load`` reads them today,
    so a saved file that leaves out an option with its default value (written by an earlier version) matches.

    Args:
        saved: the configuration file the run wrote when it started.
        config: the configuration it is resumed with (a typed configuration).
        load: the loader ``config`` came from (:func:`load_config`, ``load_active_config``).
        may_change: dotted keys (``training.max_epochs``) or sections (``budget``) that may differ.
        what: the kind of run, named in errors (``run``, ``active-learning run``).
        allowed: how the errors name ``may_change`` (default: the keys, comma-separated).

    Raises:
        FileNotFoundError: ``saved`` does not exist (the folder holds no such run).
        ConfigError: the configurations differ elsewhere (the keys named), or ``saved`` no longer loads.
    """
    if not saved.is_file():
        raise FileNotFoundError(f"--resume: {saved.parent} holds no {what} (no {saved.name})")
    try:
        started = yaml.safe_load(dump_config(load(saved), None))
    except ConfigError as error:
        raise ConfigError(f"--resume: {saved}, the configuration the {what} started with, does not load: "
                          f"{error}") from error
    now = yaml.safe_load(dump_config(config, None))
    for c in (started, now):
        for dotted in may_change:
            *parents, last = dotted.split(".")
            node = c
            for part in parents:
                node = node.get(part, {})
            node.pop(last, None)
    differ = _differing_keys(started, now)
    if differ:
        raise ConfigError(f"--resume: the configuration differs from the one the {what} in {saved.parent} started "
                          f"with in {', '.join(differ[:5])} (only {allowed or ', '.join(may_change)} may change)")


_MISSING = object()


def _differing_keys(a, b, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "."]
    return [key for k in sorted(set(a) | set(b), key=str)
            for key in _differing_keys(a.get(k, _MISSING), b.get(k, _MISSING), f"{prefix}.{k}" if prefix else str(k))]


@dataclass(frozen=True)
class FilterOptions:
    """``data.filter``: outliers dropped before the split (:func:`~mlip_uq.data.filter_frames`).

    Args:
        max_energy_per_atom: drop frames whose referenced energy per atom exceeds this (eV/atom); None keeps all.
        max_force: drop frames with a force component larger than this (eV/Å); None keeps all.
    """

    max_energy_per_atom: Optional[float] = None
    max_force: Optional[float] = None


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section: what a run trains and is tested on.

    Args:
        path: the file of labelled structures (resolved).
        test_path: a separate file of test structures (then the split has no test part); None: the split's.
        keys: the names of the labels in the files.
        energy_references: ``fit`` (per-element energies least-squares fitted on the training structures) or
            element -> eV.
        filter: outliers dropped before the split.
        split: the train/validation/test split, one type per ``kind`` (:data:`mlip_uq.data.splits.SPLITS`).
        n_train: at most this many training structures (a seeded draw); None: all. ``n_val``, ``n_test`` alike.
        min_distance: shortest interatomic distance (Å) a structure may have.
        store: the HDF5 frame store of the neighbour lists; None: ``data.h5`` in the run folder.
    """

    path: str
    split: Split
    test_path: Optional[str] = None
    keys: LabelKeys = field(default_factory=LabelKeys)
    energy_references: Union[Literal["fit"], Dict[str, float]] = "fit"
    filter: FilterOptions = field(default_factory=FilterOptions)
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    n_test: Optional[int] = None
    min_distance: float = 0.5
    store: Optional[str] = None

    @classmethod
    def from_dict(cls, values: Any) -> "DataConfig":
        """The ``data`` section, its ``split`` read into the type of its ``kind`` (``random`` by default)."""
        values = dict(section_mapping(values, "data"))
        split = dict(section_mapping(values.get("split"), "data.split"))
        kind = split.pop("kind", "random")
        if kind not in SPLITS:
            raise ConfigError(f"data.split.kind={kind!r}: expected one of {', '.join(SPLITS)}")
        fields = {f.name for f in dataclasses.fields(SPLITS[kind])}
        if values.get("test_path") and "test_fraction" in fields:  # a test file: no test part
            split["test_fraction"] = 0.0
        values["split"] = settings_from(SPLITS[kind], split, "data.split", kind=kind)
        return settings_from(cls, values, "data")


#: the model options that the data fill in where the configuration leaves them out (:class:`ModelSection`)
FROM_DATA = ("type_names", "energy_scale", "avg_num_neighbors")
#: ``model.energy_shifts``: fitted on the training structures, the data's energy references, or element -> eV
EnergyShifts = Union[Literal["fit", "references"], Dict[str, float]]


@dataclass(frozen=True)
class ModelSection:
    """The ``model`` section: the architecture as given, and what the data fill in
    (:func:`mlip_uq.train.model_config_from_data`).

    Attributes:
        config: the :class:`~mlip_uq.model.ModelConfig` of the options given (its defaults for the others, the
            run's ``seed`` unless given); ``type_names`` is empty when the data name the elements, and
            ``energy_shifts`` is None (it is :attr:`energy_shifts`).
        energy_shifts: ``fit`` (default: per-element energies least-squares fitted on the training structures),
            ``references`` (the data's energy references) or element -> eV.
        from_data: the options of :data:`FROM_DATA` the configuration leaves to the data.
    """

    config: ModelConfig
    energy_shifts: EnergyShifts = "fit"
    from_data: FrozenSet[str] = frozenset(FROM_DATA)

    @property
    def type_names(self) -> Optional[List[str]]:
        """The element names given, in type-index order; None: the data's elements."""
        return None if "type_names" in self.from_data else list(self.config.type_names)

    @classmethod
    def from_dict(cls, values: Any, seed: int) -> "ModelSection":
        """The ``model`` section, checked against :class:`~mlip_uq.model.ModelConfig` (names and types)."""
        values = dict(section_mapping(values, "model"))
        shifts = values.pop("energy_shifts", "fit")
        check_type(shifts, EnergyShifts, "model.energy_shifts")
        from_data = frozenset(k for k in FROM_DATA if k not in values)
        values.setdefault("seed", seed)
        config = settings_from(ModelConfig, {"type_names": [], **values}, "model")
        return cls(config, shifts, from_data)


@dataclass(frozen=True)
class EvaluateOptions:
    """The ``evaluate`` section: the test-set evaluation after training.

    Args:
        batch_size: structures per prediction batch.
    """

    batch_size: int = 16


@dataclass(frozen=True)
class RunConfig:
    """A checked run configuration (:func:`load_config`).

    Attributes:
        name: the run's name (default folder ``runs/<name>``); None: the method's.
        method: the training method (an entry of :data:`mlip_uq.inference.METHODS`).
        seed: the run's seed (split, subsampling, the model's initialisation unless ``model.seed``).
        data: the ``data`` section.
        model: the ``model`` section.
        evaluate: the ``evaluate`` section.
        settings: the method's ``Settings``, from its sections (``training``, ``sgmcmc``, ...).
    """

    name: Optional[str]
    method: str
    seed: int
    data: DataConfig
    model: ModelSection
    evaluate: EvaluateOptions
    settings: Any
    _values: Dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "RunConfig":
        """The typed configuration of a resolved mapping (defaults filled in, paths resolved: what
        :func:`load_config` builds); :func:`load_config` is the way to read one."""
        check_type(config.get("name"), Optional[str], "name")
        check_type(config["seed"], int, "seed")
        model = ModelSection.from_dict(config["model"], config["seed"])
        data = DataConfig.from_dict(config["data"])
        evaluate = settings_from(EvaluateOptions, config["evaluate"], "evaluate")
        settings = load_method(config["method"]).Settings.from_dict(copy.deepcopy(config))
        return cls(config.get("name"), config["method"], config["seed"], data, model, evaluate, settings,
                   copy.deepcopy(config))

    @property
    def run_name(self) -> str:
        """The name of the run's default folder: ``name``, else the method's."""
        return self.name or self.method

    def to_dict(self) -> Dict[str, Any]:
        """The resolved configuration as a mapping (a copy): what ``config.yaml`` records."""
        return copy.deepcopy(self._values)

    def with_values(self, values: Mapping[str, Any]) -> "RunConfig":
        """A copy with the dotted keys of ``values`` set (``{"data.store": path, "training.lr": 1e-3}``; a
        section name replaces the section), checked again by :func:`load_config`; relative paths are taken
        from the working directory."""
        config = self.to_dict()
        for key, value in values.items():
            set_value(config, key, copy.deepcopy(value))
        return load_config(config)
