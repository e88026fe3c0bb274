"""Configuration of an active-learning run (``mlip-uq active CONFIG.yaml``): sections, defaults, structure
sources; see :mod:`mlip_uq.active.loop` for what each section means."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import ase
import numpy as np

from ..config import (
    ConfigError,
    apply_override,
    load_config,
    merge_sections,
    read_config_file,
    resolve_method_paths,
    resolve_path,
    settings_from,
)
from ..data import read_frames
from .explore import EXPLORER_OPTIONS
from .state import bare_atoms

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
#: options of a structure source (initial, test, explore.starts, explore.pool)
SOURCE_KEYS = {"path", "index", "n", "max_atoms"}


def load_active_config(source, overrides: Iterable[str] = ()) -> Dict:
    """Read an active-learning configuration (path or dict), fill defaults, apply ``key=value`` overrides and
    resolve relative paths against the configuration's folder.

    Raises:
        ConfigError: unknown section or option, missing ``oracle``/``initial.path``/``rule``, bad override.
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
    cfg["oracle"], cfg["rule"], cfg["update"] = dict(raw["oracle"]), dict(raw["rule"]), dict(raw.get("update") or {})
    kind = raw["explore"].get("kind", "md")
    if kind not in EXPLORE_DEFAULTS:
        raise ConfigError(f"explore.kind {kind!r} unknown; use md or pool")
    explore = merge_sections(EXPLORE_DEFAULTS[kind], {k: v for k, v in raw["explore"].items() if k != "kind"})
    unknown = set(explore) - set(EXPLORE_DEFAULTS[kind])
    if unknown:
        raise ConfigError(f"unknown explore option(s) {sorted(unknown)} for kind {kind}; "
                          f"known: {sorted(EXPLORE_DEFAULTS[kind])}")
    settings_from(EXPLORER_OPTIONS[kind], explore, "explore")  # types and cross-checks, before any reference call
    cfg["explore"] = {"kind": kind, **explore}
    unknown = set(cfg["budget"]) - set(DEFAULTS["budget"])
    if unknown:
        raise ConfigError(f"unknown budget option(s) {sorted(unknown)}; known: {sorted(DEFAULTS['budget'])}")
    if cfg["initial"]["labels"] not in ("oracle", "file"):
        raise ConfigError(f"initial.labels must be oracle or file, got {cfg['initial']['labels']!r}")
    sources = {"test": cfg["test"], "explore.starts": cfg["explore"].get("starts"),
               "explore.pool": cfg["explore"].get("pool"), "initial": cfg["initial"]}
    for name, source in sources.items():
        if not source:
            continue
        unknown = set(source) - SOURCE_KEYS - ({"labels"} if name == "initial" else set())
        if unknown:
            raise ConfigError(f"unknown {name} option(s) {sorted(unknown)}; known: {sorted(SOURCE_KEYS)}")
        if source.get("path"):
            source["path"] = str(resolve_path(source["path"], base))
    if not cfg["initial"]["path"]:
        raise ConfigError("initial.path is required (the structures of the starting training set)")
    train = cfg["train"]
    resolve_method_paths(train, base)
    if "data" in train and "path" in train["data"]:
        raise ConfigError("train.data.path is filled in by the loop (the labelled initial set); leave it out")
    return cfg


def pick_structures(section: Dict, seed: int, exclude: Iterable[int] = (), labelled: bool = False
          ) -> Tuple[List[ase.Atoms], List[int]]:
    """The structures of a source section: frames ``index`` of ``path``, those with at most ``max_atoms`` atoms,
    ``n`` of them drawn at random (seeded, kept in file order); without labels unless ``labelled`` (then energy
    and forces are required). Returns them with their positions in the selection read from the file."""
    frames = read_frames(section["path"], index=section.get("index", ":"),
                         require=("energy", "forces") if labelled else ())
    excluded, max_atoms = set(exclude), section.get("max_atoms")
    indices = [i for i in range(len(frames))
               if i not in excluded and (max_atoms is None or len(frames[i]) <= max_atoms)]
    if not indices:
        raise ConfigError(f"{section['path']}: no structure selected (index {section.get('index', ':')!r}, "
                          f"max_atoms {max_atoms})")
    n = section.get("n")
    if n is not None and n < len(indices):
        indices = sorted(np.random.default_rng(seed).choice(indices, size=int(n), replace=False).tolist())
    return [frames[i] if labelled else bare_atoms(frames[i]) for i in indices], indices


def train_config(cfg: Dict, out: Path) -> Dict:
    """The training configuration of the loop's posterior: ``cfg["train"]`` with ``data.path`` the labelled
    initial set in ``out`` (``initial.extxyz``), a random split without test part by default and the loop's
    seed; validated now (sections, method, options), with a path that need not exist yet."""
    train = copy.deepcopy(cfg["train"])
    data = train.setdefault("data", {})
    data["path"] = str(Path(out) / "initial.extxyz")
    data.setdefault("split", {"kind": "random", "val_fraction": 0.1, "test_fraction": 0.0})
    data["split"].setdefault("test_fraction", 0.0)
    train.setdefault("seed", int(cfg["seed"]))
    train.setdefault("model", {})
    return load_config(train)
