"""Run configurations: YAML files plus ``key=value`` overrides on the command line.

A configuration has the top-level sections ``name``, ``method``, ``seed``, ``data``, ``model``, ``evaluate``
and one or more sections per training method (``training``, ``sgmcmc``, ``vi``, ``ensemble``, ``dropout``: the
sections of :data:`mlip_uq.inference.METHODS`); see ``configs/*.yaml`` for documented examples. Relative paths
(data files, store, and the options a method's ``Settings.PATHS`` names, such as pre-trained weights) are
resolved against the folder of the configuration file; ``dataset:NAME/FILE`` names a file of a public data set
fetched into the cache by ``mlip-uq data fetch NAME`` (:mod:`mlip_uq.datasets`).

Which sections a method reads:

- ``map``: ``training`` (:class:`~mlip_uq.inference.trainer.MAPSettings`).
- ``sgmcmc``: ``sgmcmc`` (:class:`~mlip_uq.inference.sgmcmc.SGMCMCSettings`), and ``training`` for the MAP
  phase that the chains start from when ``sgmcmc.init`` or ``sgmcmc.prior.center`` is ``map``.
- ``ensemble``: ``ensemble`` (``n_members``, ``bootstrap``; :class:`~mlip_uq.inference.ensemble.EnsembleSettings`)
  and ``training`` for every member.
- ``vi``: ``vi`` (:class:`~mlip_uq.inference.vi.VISettings`; ``stochastic``, ``prior`` and ``noise`` shaped as in
  ``sgmcmc``), and ``training`` for the MAP phase that initialises the means when ``vi.init`` is not set.
- ``dropout``: ``training`` (MAP training with dropout active; the rate is ``model.dropout``) and ``dropout``
  (``n_samples``, ``seed``; :class:`~mlip_uq.inference.dropout.DropoutSettings`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import yaml

from .datasets import dataset_path, is_dataset_path
from .files import atomic_write
from .inference import METHODS, method_sections

#: sections of every run configuration; the methods' sections come from :data:`mlip_uq.inference.METHODS`
BASE_SECTIONS = ("name", "method", "seed", "data", "model", "evaluate")
# the value of a pre-trained-weights option (``sgmcmc.init``, ``sgmcmc.prior.center``) that names the MAP model
# the run trains first, instead of a file
FROM_MAP = "map"

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


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


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
    parts = key.strip().split(".")
    if parts[0] not in sections:
        raise ConfigError(f"override {override!r}: unknown section {parts[0]!r}; sections: {sorted(sections)}")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = parse_yaml(raw)


def read_config_file(source) -> Tuple[Dict[str, Any], Path]:
    """A configuration as a mapping (``source``: a YAML file, or a dict, copied) and the folder its relative
    paths are resolved against (the file's, or the working directory for a dict)."""
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


def load_config(source, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Read a YAML configuration (path or dict), fill defaults, apply overrides and resolve data paths."""
    raw, base_dir = read_config_file(source)
    known = training_sections()
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown configuration section(s) {sorted(unknown)}; known: {sorted(known)}")
    config = merge_sections(defaults(), raw)
    if "split" in raw.get("data", {}):  # a split is taken whole: another kind has other options than the default's
        config["data"]["split"] = copy.deepcopy(raw["data"]["split"])
    for override in overrides:
        apply_override(config, override)
    if config["method"] not in METHODS:
        raise ConfigError(f"method {config['method']!r} is not available; available: {list(METHODS)}")
    data = config["data"]
    if not data.get("path"):
        raise ConfigError("data.path is required (the file of labelled structures to train on)")
    for key in ("path", "test_path", "store"):
        if data.get(key):
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


def settings_from(cls, values: Any, section: str):
    """``cls(**values)`` for a settings dataclass, with every option's type checked against ``cls``'s annotations.

    Args:
        cls: the dataclass.
        values: the options (a mapping; None is read as no options).
        section: the configuration key of ``values``, named in errors (e.g. ``training``, ``sgmcmc.noise``).

    Raises:
        ConfigError: ``values`` is not a mapping, an option is unknown, or a value has the wrong type (the error
            names the key, its value and what is expected).

    Example:
        >>> @dataclasses.dataclass
        ... class Example:
        ...     max_epochs: int = 10
        >>> settings_from(Example, {"max_epochs": 5}, "training")
        Example(max_epochs=5)
        >>> settings_from(Example, {"max_epochs": "ten"}, "training")
        Traceback (most recent call last):
        ...
        mlip_uq.config.ConfigError: training.max_epochs='ten': expected an integer
    """
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{section}={values!r}: expected a mapping of options")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {section} option(s) {sorted(unknown)}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        check_type(value, hints[name], f"{section}.{name}")
    return cls(**values)


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
             list: "a list", type(None): "null"}


def check_type(value: Any, hint: Any, key: str) -> None:
    """Check a configuration value against a type annotation (``int``, ``float``, ``bool``, ``str``, ``dict``,
    ``list``, their ``Optional``/``Union``, ``Literal``, a dataclass = a mapping).

    An ``int`` is not a ``bool`` (``true`` for ``max_epochs`` is an error), a ``float`` accepts integers.

    Raises:
        ConfigError: ``key=value: expected ...``.

    Example:
        >>> check_type(5, typing.Optional[int], "sgmcmc.cycle_steps")
        >>> check_type(1.5, int, "sgmcmc.n_chains")
        Traceback (most recent call last):
        ...
        mlip_uq.config.ConfigError: sgmcmc.n_chains=1.5: expected an integer
    """
    options = _alternatives(hint)
    if any(_matches(value, option) for option in options):
        return
    raise ConfigError(f"{key}={value!r}: expected {' or '.join(_describe(o) for o in options)}")


def _alternatives(hint: Any) -> Tuple[Any, ...]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(a for arg in typing.get_args(hint) for a in _alternatives(arg))
    return (hint,)


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence, Sequence):
        return isinstance(value, (list, tuple))
    if origin in (dict, typing.Mapping, typing.Dict):
        return isinstance(value, dict)
    return isinstance(value, origin)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint) or hint
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if origin in (tuple, typing.Sequence, Sequence):
        origin = list
    return _EXPECTED.get(origin, getattr(origin, "__name__", str(origin)))


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


def dump_config(config: Dict[str, Any], path: Optional[Path]) -> str:
    """``config`` as YAML (key order kept), written atomically to ``path`` unless it is None."""
    text = yaml.safe_dump(config, sort_keys=False)
    if path is not None:
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    return text


def check_resumed_config(saved: Path, config: Dict[str, Any], may_change: Sequence[str], what: str,
                         allowed: Optional[str] = None) -> None:
    """Check that a resumed run's configuration is the one it started with (``saved``, a YAML file written by
    :func:`dump_config`), but for the dotted keys ``may_change``.

    Args:
        saved: the configuration file the run wrote when it started.
        config: the configuration it is resumed with.
        may_change: dotted keys (``training.max_epochs``) or sections (``budget``) that may differ.
        what: the kind of run, named in errors (``run``, ``active-learning run``).
        allowed: how the errors name ``may_change`` (default: the keys, comma-separated).

    Raises:
        FileNotFoundError: ``saved`` does not exist (the folder holds no such run).
        ConfigError: the configurations differ elsewhere.
    """
    if not saved.is_file():
        raise FileNotFoundError(f"--resume: {saved.parent} holds no {what} (no {saved.name})")
    started = yaml.safe_load(saved.read_text())
    now = yaml.safe_load(dump_config(config, None))
    for c in (started, now):
        for dotted in may_change:
            *parents, last = dotted.split(".")
            node = c
            for part in parents:
                node = node.get(part, {})
            node.pop(last, None)
    if started != now:
        raise ConfigError(f"--resume: the configuration differs from the one the {what} in {saved.parent} started "
                          f"with (only {allowed or ', '.join(may_change)} may change)")
