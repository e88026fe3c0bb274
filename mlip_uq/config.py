"""Run configurations: YAML files plus ``key=value`` overrides on the command line.

A configuration has the top-level sections ``method``, ``seed``, ``data``, ``model``, ``training``, ``sgmcmc``,
``vi``, ``ensemble``, ``dropout`` and ``evaluate``; see ``configs/*.yaml`` for documented examples. Relative
paths (data files, store, pre-trained weights) are resolved against the folder of the configuration file.

Which sections a method reads:

- ``map``: ``training`` (:class:`~mlip_uq.inference.map.MAPSettings`).
- ``sgmcmc``: ``sgmcmc`` (:class:`~mlip_uq.inference.sampling.SGMCMCSettings`).
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
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import yaml

SECTIONS = {"name", "method", "seed", "data", "model", "training", "sgmcmc", "vi", "ensemble", "dropout", "evaluate"}
METHODS = ("map", "sgmcmc", "vi", "ensemble", "dropout")

DEFAULTS: Dict[str, Any] = {
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
    "training": {},
    "sgmcmc": {},
    "vi": {},
    "ensemble": {},
    "dropout": {},
    "evaluate": {"batch_size": 16},
}


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


def apply_override(config: Dict[str, Any], override: str, sections=SECTIONS) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML (``5``, ``1e-3``, ``[a, b]``).
    The first key must be one of ``sections`` (default: those of a training configuration)."""
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
    unknown = set(raw) - SECTIONS
    if unknown:
        raise ConfigError(f"unknown configuration section(s) {sorted(unknown)}; known: {sorted(SECTIONS)}")
    config = merge_sections(DEFAULTS, raw)
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
            data[key] = str(_resolve(data[key], base_dir))
    for section in (config["sgmcmc"], config["vi"]):
        if section.get("init"):
            section["init"] = str(_resolve(section["init"], base_dir))
        if isinstance(section.get("prior"), dict) and section["prior"].get("center"):
            section["prior"]["center"] = str(_resolve(section["prior"]["center"], base_dir))
    return config


def settings_from(cls, values: Dict[str, Any], section: str):
    """``cls(**values)`` for a settings dataclass, naming unknown options of configuration ``section``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {section} option(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def dump_config(config: Dict[str, Any], path: Optional[Path]) -> str:
    text = yaml.safe_dump(config, sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
