"""The active-learning loop: explore → label with the reference calculator → commit → update the posterior.

``mlip-uq active CONFIG.yaml`` runs :func:`run_active`. A configuration has the sections

- ``oracle`` — the reference calculator (:func:`~mlip_uq.active.oracle.oracle_from_config`);
- ``initial`` — the starting structures ``{path, index, n, labels}``; ``n`` of them are drawn at random (seeded)
  and labelled by the oracle (``labels: oracle``, so that training data and reference agree) or keep the labels
  of the file (``labels: file``);
- ``test`` — optional ``{path, index, n}``: structures labelled once by the oracle; after every update the test
  metrics (DESIGN.md names) are added to the history;
- ``explore`` — ``kind: md`` (walkers from ``starts: {path, index}``, ``steps`` MD steps each, run in chunks of
  ``chunk_steps``, at least ``min_gap`` steps between two calls of a walker, ``timestep_fs``, ``temperature_K``,
  ``ensemble``) or ``kind: pool`` (candidates from
  ``pool: {path, index, n}``, ``batch`` labelled per round, predictions in batches of ``batch_size``);
- ``rule`` — when to call the oracle (:func:`~mlip_uq.active.rules.rule_from_config`);
- ``budget`` — ``max_calls`` (reference calls during exploration) and ``target_forces_mae`` (eV/Å on the test
  set; stop when reached);
- ``update`` — warm-start options of the posterior update (:mod:`mlip_uq.active.update`);
- ``train`` — the training configuration of the posterior, as for ``mlip-uq train`` (``method`` ``sgmcmc`` or
  ``ensemble``, ``model``, ``sgmcmc``/``ensemble``/``training``, ``data`` options such as
  ``energy_references`` and ``split``; ``data.path`` is filled in with the labelled initial set).

Files in the output folder: ``state.json`` (loop state, atomic), ``decisions.jsonl`` (every decision: step,
uncertainty, rule, call time, outcome), ``labelled.h5`` (FrameStore of every labelled structure, in order),
``test.h5``, ``initial.extxyz``, ``model/`` (the posterior and its checkpoints), ``summary.json``.

Order of a labelled decision (write-ahead): the state is written with the decision ``pending`` (labels
included), the decision is appended to the log, the structure is appended to the store (atomic rewrite), the
state is written again without ``pending`` and with an update due; the update itself is checkpointed by the
training method. A kill at any point resumes (``resume=True``) without losing or duplicating a structure: a
pending decision is finished idempotently, a killed MD chunk is replayed exactly (seeded thermostat, saved rule
state), a killed update is resumed.

Overhead: ``timings`` in the state and in ``summary.json`` split the wall time into ``oracle`` (reference
calls), ``update`` (posterior fits), ``explore`` (the model's predictions during MD and on the pool),
``evaluate`` (test metrics) and ``bookkeeping`` (the rest: state, log and store writes, graph building,
selection).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import logging
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import ase
import ase.io
import numpy as np
import torch
import yaml
from ase.data import atomic_numbers
from nequip.data import AtomicDataDict

from ..calculator import UQCalculator
from ..config import ConfigError, apply_override, dump_config, load_config, merge_sections, read_config_file
from ..data import FrameStore, frames_fingerprint, read_frames
from ..evaluate import metrics_and_plots, predict_graphs
from ..md import RECORD_KEYS, run_md
from ..model import ModelConfig
from ..posterior import load_posterior
from ..train import method_settings, model_config_from_data, prepare_data
from .explore import Walker, next_walker, pool_uncertainty
from .oracle import FAILED, LABELLED, REJECTED, Oracle, OracleResult, oracle_from_config
from .rules import CalibratedRule, rule_from_config
from .state import (
    DecisionLog,
    atoms_from_dict,
    atoms_to_dict,
    bare_atoms,
    composition_key,
    read_json,
    write_json_atomic,
)
from .update import make_update

log = logging.getLogger(__name__)

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
EXPLORE_DEFAULTS = {
    "md": {"starts": {"path": None, "index": "0"}, "steps": 1000, "chunk_steps": 200, "min_gap": 10,
           "timestep_fs": 0.5, "temperature_K": 300.0, "ensemble": "langevin"},
    "pool": {"pool": {"path": None, "index": ":", "n": None}, "batch": 5, "batch_size": 16},
}
#: test metrics kept in the history after every update
HISTORY_METRICS = ("energy_mae", "forces_mae", "forces_rmse", "forces_nll", "forces_miscal_area", "forces_spearman")
#: options of a structure source (initial, test, explore.starts, explore.pool)
SOURCE_KEYS = {"path", "index", "n", "max_atoms"}
FORMAT = "mlip_uq.ActiveLoop"
TIMING_KEYS = ("oracle", "update", "explore", "evaluate")


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
            source["path"] = str(_resolve(source["path"], base))
    if not cfg["initial"]["path"]:
        raise ConfigError("initial.path is required (the structures of the starting training set)")
    train = cfg["train"]
    sgmcmc = train.get("sgmcmc") or {}
    if sgmcmc.get("init"):
        sgmcmc["init"] = str(_resolve(sgmcmc["init"], base))
    if isinstance(sgmcmc.get("prior"), dict) and sgmcmc["prior"].get("center"):
        sgmcmc["prior"]["center"] = str(_resolve(sgmcmc["prior"]["center"], base))
    if "data" in train and "path" in train["data"]:
        raise ConfigError("train.data.path is filled in by the loop (the labelled initial set); leave it out")
    return cfg


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _pick(section: Dict, seed: int, exclude: Iterable[int] = (), labelled: bool = False
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class ActiveLoop:
    """One active-learning run in ``out``; see the module docstring.

    Args:
        cfg: a configuration from :func:`load_active_config`.
        out: output folder.
        resume: continue the run in ``out``; without it, ``out`` must not hold a run.
        oracle: the reference calculator; default the one of ``cfg["oracle"]``.
    """

    def __init__(self, cfg: Dict, out: Path, resume: bool = False, oracle: Optional[Oracle] = None):
        self.cfg, self.out = cfg, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.seed = int(cfg["seed"])
        self.state_path = self.out / "state.json"
        self.store_path = self.out / "labelled.h5"
        self._check_run(resume)
        self.oracle = oracle or oracle_from_config(cfg["oracle"])
        self.rule = rule_from_config(cfg["rule"], seed=self.seed)
        self.explore = cfg["explore"]
        if self.explore["kind"] == "md" and self.rule.kind == "top_k":
            raise ConfigError("rule top_k ranks a candidate pool; with explore.kind md use force_std, calibrated "
                              "or random")
        if self.explore["kind"] == "md" and self.rule.kind == "random" and self.rule.probability is None:
            raise ConfigError("rule random during MD needs rule.probability (the chance of a call per MD step)")
        self.train_cfg = self._train_config()
        self.settings = method_settings(self.train_cfg)
        self.initial_frames, initial_indices = _pick(cfg["initial"], self.seed,
                                                     labelled=cfg["initial"]["labels"] == "file")
        self.starts: List[ase.Atoms] = []
        self.pool_frames: List[ase.Atoms] = []
        if self.explore["kind"] == "md":
            starts = dict(self.explore["starts"])
            starts["path"] = starts.get("path") or cfg["initial"]["path"]
            self.starts = _pick(starts, self.seed)[0]
        else:
            pool = self.explore["pool"]
            if not pool.get("path"):
                raise ConfigError("explore.pool.path is required with explore.kind pool")
            same = pool["path"] == cfg["initial"]["path"] and pool.get("index", ":") == cfg["initial"].get("index", ":")
            self.pool_frames, self.pool_indices = _pick(pool, self.seed + 1, exclude=initial_indices if same else ())
        structures = self.initial_frames + self.starts + self.pool_frames
        self.type_names = self.train_cfg["model"].get("type_names") or sorted(
            {s for a in structures for s in a.get_chemical_symbols()}, key=lambda s: atomic_numbers[s])
        self.train_cfg["model"]["type_names"] = self.type_names
        self.r_max = float(self.train_cfg["model"].get("r_max", ModelConfig.r_max))
        self.dtype = getattr(torch, self.train_cfg["model"].get("dtype", ModelConfig.dtype))
        if self.state_path.is_file():
            self.state = read_json(self.state_path)
            if self.state.get("format") != FORMAT:
                raise ValueError(f"{self.state_path} is not the state of an active-learning loop")
            if self.state["phase"] == "done":  # resumed after its end, e.g. with a larger budget
                self.state.update(phase="explore", stop_reason=None)
        else:
            self.state = self._new_state(initial_indices)
        self.rule.load_state_dict(self.state["rule"])
        self.log = DecisionLog(self.out / "decisions.jsonl", self.state["n_decisions"])
        self._t0 = time.perf_counter()
        self._total0 = self.state["timings"]["total"]
        self._posterior = None
        self._calculator = None
        self._prepared = None
        self._test_graphs = None
        self._pool_cache = None
        self.updater = None

    # ------------------------------------------------------------------ setup
    def _check_run(self, resume: bool) -> None:
        saved = self.out / "active_config.yaml"
        if not resume:
            if self.state_path.is_file():
                raise ConfigError(f"{self.out} already holds an active-learning run; resume it (--resume) or "
                                  "choose another output folder")
            for name in ("test.h5", "labelled.h5", "decisions.jsonl", "initial.extxyz"):
                (self.out / name).unlink(missing_ok=True)  # left by a start killed before its first state
            dump_config(self.cfg, saved)
            return
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {self.out} holds no active-learning run (no active_config.yaml)")
        started = yaml.safe_load(saved.read_text())
        now = yaml.safe_load(dump_config(self.cfg, None))
        for c in (started, now):
            c.pop("budget", None)  # a resumed run may be given another budget
        if started != now:
            raise ConfigError(f"--resume: the configuration differs from the one the run in {self.out} started "
                              "with (only the budget may change)")
        dump_config(self.cfg, saved)

    def _train_config(self) -> Dict:
        train = copy.deepcopy(self.cfg["train"])
        data = train.setdefault("data", {})
        data["path"] = str(self.out / "initial.extxyz")
        data.setdefault("split", {"kind": "random", "val_fraction": 0.1, "test_fraction": 0.0})
        data["split"].setdefault("test_fraction", 0.0)
        train.setdefault("seed", self.seed)
        train.setdefault("model", {})
        # validate now (sections, method, options), with a path that need not exist yet
        return load_config(train)

    def _new_state(self, initial_indices: List[int]) -> Dict:
        walkers = [Walker.new(i, a, float(self.explore["temperature_K"]), self.seed).__dict__
                   for i, a in enumerate(self.starts)]
        return {
            "format": FORMAT,
            "version": 1,
            "phase": "initial",
            "n_decisions": 0,
            "n_labelled": 0,
            "n_initial_labelled": None,
            "calls": {"initial": 0, "explore": 0, "test": 0},
            "initial": {"indices": initial_indices, "next": 0},
            "pending": None,
            "update": {"count": 0, "pending": False, "started": False},
            "posterior": None,
            "walkers": walkers,
            "current_walker": -1,
            "md_steps": 0,
            "pool": {"used": [], "batch": [], "round": 0},
            "rule": self.rule.state_dict(),
            "rejected": {},
            "history": [],
            "timings": {**{k: 0.0 for k in TIMING_KEYS}, "total": 0.0},
            "stop_reason": None,
        }

    # ------------------------------------------------------------------ persistence
    def _save(self) -> None:
        self.state["rule"] = self.rule.state_dict()
        self.state["timings"]["total"] = self._total0 + (time.perf_counter() - self._t0)
        write_json_atomic(self.state, self.state_path)

    @contextlib.contextmanager
    def _timed(self, key: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.state["timings"][key] += time.perf_counter() - start

    def _commit(self, record: Dict, labelled: Optional[ase.Atoms]) -> None:
        """Record a decision (and its labelled structure) write-ahead, then finish it (see module docstring)."""
        record = {"decision": self.state["n_decisions"], "time": _now(), **record}
        if labelled is not None:
            record["store_index"] = self.state["n_labelled"]
        self.state["pending"] = {"record": record, "frame": None if labelled is None else atoms_to_dict(labelled)}
        self._save()
        self._finish_pending()

    def _finish_pending(self) -> None:
        pending = self.state["pending"]
        record = pending["record"]
        self.log.ensure(record)
        if pending["frame"] is not None:
            index = record["store_index"]
            atoms = atoms_from_dict(pending["frame"])
            n = len(FrameStore.open(self.store_path)) if self.store_path.is_file() else 0
            if n == index:
                if n == 0:
                    FrameStore.create(self.store_path, [atoms], self.type_names, self.r_max, source="active learning")
                else:
                    FrameStore.open(self.store_path).append([atoms])
            elif n != index + 1 or (frames_fingerprint(FrameStore.open(self.store_path).atoms([index]))
                                    != frames_fingerprint([atoms])):
                raise RuntimeError(f"{self.store_path} holds {n} structures, the loop state expects {index} before "
                                   "this decision: the store and the state do not belong together")
            self.state["n_labelled"] = index + 1
            if self.state["phase"] == "explore":
                self.state["update"]["pending"] = True
        self.state["n_decisions"] = record["decision"] + 1
        self.state["pending"] = None
        self._save()

    # ------------------------------------------------------------------ oracle
    def _call(self, atoms: ase.Atoms, phase: str) -> OracleResult:
        """Label ``atoms`` unless its composition was rejected before (then a ``rejected`` result, no call)."""
        key = composition_key(atoms)
        if key in self.state["rejected"]:
            return OracleResult(REJECTED, 0.0, message=f"composition {key} rejected before: "
                                f"{self.state['rejected'][key]}", called=False)
        with self._timed("oracle"):
            result = self.oracle.label(atoms)
        if result.called:
            self.state["calls"][phase] += 1
        if result.outcome == REJECTED:
            self.state["rejected"][key] = result.message
        return result

    def _record(self, phase: str, source: str, result: OracleResult, **values) -> Dict:
        record = {"phase": phase, "source": source, **values, "outcome": result.outcome,
                  "called": result.called, "call_s": round(result.seconds, 6), "message": result.message,
                  "n_calls": self.state["calls"]["initial"] + self.state["calls"]["explore"]}
        level = logging.WARNING if result.outcome != LABELLED else logging.INFO
        detail = f" ({result.message})" if result.message else ""
        uncertainty = f", max force std {values['uncertainty']:.3g} eV/Å" if "uncertainty" in values else ""
        log.log(level, "%s %s%s: %s in %.3f s%s", phase, source, uncertainty, result.outcome, result.seconds, detail)
        return record

    # ------------------------------------------------------------------ data
    def _test(self) -> List:
        """Test graphs, labelled by the oracle once (``test.h5``); [] without a test section."""
        if not self.cfg["test"]:
            return []
        if self._test_graphs is None:
            path = self.out / "test.h5"
            if not path.is_file():
                frames, _ = _pick(self.cfg["test"], self.seed + 2)
                labelled = []
                for i, atoms in enumerate(frames):
                    result = self._call(atoms, "test")
                    if result.outcome == LABELLED:
                        labelled.append(result.atoms)
                    else:
                        log.warning("test structure %d: %s (%s)", i, result.outcome, result.message)
                if not labelled:
                    raise RuntimeError("no test structure could be labelled by the oracle")
                FrameStore.create(path, labelled, self.type_names, self.r_max, source=self.cfg["test"]["path"])
                self._save()
                log.info("test set: %d structures labelled by %s", len(labelled), self.oracle.name)
            self._test_graphs = FrameStore.open(path).graphs(dtype=self.dtype)
        return self._test_graphs

    def _data(self):
        """(prepared initial data, model config); the initial set goes through ``prepare_data``."""
        if self._prepared is None:
            n_initial = self.state["n_initial_labelled"]
            path = self.out / "initial.extxyz"
            if not path.is_file():
                frames = FrameStore.open(self.store_path).atoms(list(range(n_initial)))
                tmp = path.with_suffix(".tmp.extxyz")
                ase.io.write(tmp, frames, format="extxyz")
                tmp.replace(path)
            work = self.out / "model"
            work.mkdir(exist_ok=True)
            prepared = prepare_data(self.train_cfg, work)
            model_config = model_config_from_data(self.train_cfg, prepared)
            self._prepared = (prepared, model_config)
            self.updater = make_update(self.train_cfg["method"], model_config, self.settings, self.cfg["update"], work)
        return self._prepared

    def _training_sets(self):
        prepared, _ = self._data()
        new = list(range(self.state["n_initial_labelled"], self.state["n_labelled"]))
        graphs = FrameStore.open(self.store_path).graphs(new, dtype=self.dtype) if new else []
        return prepared.train + graphs, prepared.val

    def posterior(self):
        """The current posterior (loaded once per update)."""
        if self._posterior is None:
            self._posterior = load_posterior(self.out / self.state["posterior"])
        return self._posterior

    def calculator(self):
        """An ASE calculator of the current posterior."""
        if self._calculator is None:
            self._calculator = UQCalculator(self.posterior())
        return self._calculator

    # ------------------------------------------------------------------ phases
    def _initial_step(self) -> None:
        initial = self.state["initial"]
        i = initial["next"]
        if i >= len(initial["indices"]):
            if self.state["n_labelled"] == 0:
                raise RuntimeError("no structure of the initial set could be labelled by the oracle")
            self.state["n_initial_labelled"] = self.state["n_labelled"]
            self.state["phase"] = "explore"
            self._save()
            return
        atoms = self.initial_frames[i]
        initial["next"] = i + 1
        if self.cfg["initial"]["labels"] == "file":
            result = OracleResult(LABELLED, 0.0, atoms=atoms, called=False)
        else:
            result = self._call(atoms, "initial")
        record = self._record("initial", f"initial[{initial['indices'][i]}]", result, rule="initial")
        self._commit(record, result.atoms)

    def _fit(self) -> None:
        """Fit (first) or update the posterior on every labelled structure, then evaluate on the test set."""
        update = self.state["update"]
        index, resume = update["count"], update["started"]
        train, val = self._training_sets()
        prepared, _ = self._data()
        update["started"] = True
        self._save()
        metadata = dict(energy_references=prepared.energy_references,
                        data_fingerprint=frames_fingerprint(FrameStore.open(self.store_path).atoms()))
        log.info("posterior %s %d on %d structures", "update" if index else "fit", index, len(train) + len(val))
        start = time.perf_counter()
        with self._timed("update"):
            path = self.updater.fit(train, val, index, resume, metadata)
        seconds = time.perf_counter() - start
        self._posterior = self._calculator = None
        self.state["posterior"] = str(path.relative_to(self.out))
        self._check_posterior(train + val, index)
        metrics = {}
        if self._test():
            with self._timed("evaluate"):
                pred = predict_graphs(self.posterior(), self._test(), self.train_cfg["evaluate"]["batch_size"])
                metrics = {k: v for k, v in metrics_and_plots(pred).items() if k in HISTORY_METRICS}
        entry = {"update": index, "n_labelled": self.state["n_labelled"], "n_train": len(train) + len(val),
                 "calls_initial": self.state["calls"]["initial"], "calls_explore": self.state["calls"]["explore"],
                 "md_steps": self.state["md_steps"], "update_s": seconds, **metrics}
        if isinstance(self.rule, CalibratedRule):
            entry["calibration_scale"] = self.rule.scale
        self.state["history"].append(entry)
        self.state["update"] = {"count": index + 1, "pending": False, "started": False}
        self._save()
        if metrics:
            log.info("after %d reference calls: test forces MAE %.4f eV/Å, energy MAE %.4f eV/atom",
                     entry["calls_initial"] + entry["calls_explore"], metrics["forces_mae"], metrics["energy_mae"])

    def _check_posterior(self, graphs: List, index: int) -> None:
        """Predict the training structures with the new posterior: every force and std must be finite (a sampler
        chain that diverged between two samples leaves a sample with huge parameters). With ``prior_scale:
        initial`` the calibrated rule takes its s₀ from these residuals."""
        with self._timed("evaluate"):
            forces, stds = pool_uncertainty(self.posterior(), graphs)
        forces, stds = np.concatenate(forces), np.concatenate(stds)
        if not (np.isfinite(forces).all() and np.isfinite(stds).all()):
            raise RuntimeError(
                f"the posterior of {'update' if index else 'fit'} {index} ({self.out / self.state['posterior']}) "
                "predicts NaN/inf forces on its own training structures: a sample of a diverged chain or member "
                "(for SG-MCMC: lower sgmcmc.lr). The loop cannot go on with it.")
        if isinstance(self.rule, CalibratedRule) and self.rule.needs_prior:
            true = np.concatenate([g[AtomicDataDict.FORCE_KEY].double().numpy() for g in graphs])
            self.rule.set_prior(forces, true, stds)
            log.info("calibrated rule: prior std scale %.3g from the residuals of the %d training structures",
                     self.rule.prior_scale, len(graphs))

    def _stop_reason(self) -> Optional[str]:
        budget = self.cfg["budget"]
        target = budget.get("target_forces_mae")
        history = self.state["history"]
        if target is not None and history and history[-1].get("forces_mae", np.inf) <= target:
            return f"target reached: test forces MAE {history[-1]['forces_mae']:.4g} <= {target} eV/Å"
        if budget.get("max_calls") is not None and self.state["calls"]["explore"] >= budget["max_calls"]:
            return f"budget used: {self.state['calls']['explore']} reference calls"
        if self.explore["kind"] == "md" and all(w["done"] for w in self.state["walkers"]):
            return "every MD walker finished its steps"
        if self.explore["kind"] == "pool" and not self.state["pool"]["batch"]:
            if len(self.state["pool"]["used"]) >= len(self.pool_frames):
                return "pool exhausted"
        return None

    def _md_step(self) -> None:
        """Run one chunk of the next walker; label the structure where the rule fires."""
        walkers = [Walker(**w) for w in self.state["walkers"]]
        walker = next_walker(walkers, self.state["current_walker"])
        self.state["current_walker"] = walker.index
        total = int(self.explore["steps"])
        steps = min(int(self.explore["chunk_steps"]), total - walker.steps_done)
        atoms = walker.current()
        fired: Dict = {}

        def on_uncertain(step, current, record):
            # not the chunk's starting structure (labelled already, or checked at the end of the last chunk), and
            # not within min_gap steps of the walker's last call (consecutive MD frames are nearly the same)
            if step == 0 or (walker.last_call >= 0 and before + step - walker.last_call < min_gap):
                return False
            results = current.calc.results
            fired.update(step=int(step), atoms=atoms_to_dict(current, momenta=True),
                         forces=np.array(results["forces"]), std=np.array(results["atom_force_std"]))
            return True

        before, min_gap = walker.steps_done, int(self.explore["min_gap"])
        with self._timed("explore"):
            result = run_md(atoms, self.calculator(), steps=steps, timestep_fs=float(self.explore["timestep_fs"]),
                            temperature_K=float(self.explore["temperature_K"]), ensemble=self.explore["ensemble"],
                            out_dir=None, stop_rule=self.rule, on_uncertain=on_uncertain,
                            seed=walker.chunk_seed(self.seed), progress=False)
        walker.chunks += 1
        done = fired["step"] if fired else result.steps_done
        self._append_trace(walker.index, [{**r, "step": before + r["step"]} for r in result.records
                                          if 0 < r["step"] <= done])
        walker.steps_done += done
        self.state["md_steps"] += done
        if not fired:
            walker.atoms = atoms_to_dict(atoms, momenta=True)
            walker.done = walker.steps_done >= total
            self._set_walkers(walkers, walker)
            self._save()
            return
        current = atoms_from_dict(fired["atoms"])
        values = {"rule": self.rule.kind, "step": walker.steps_done, "md_steps": self.state["md_steps"],
                  **self.rule.values(fired["std"], fired["forces"])}
        result = self._call(current, "explore")
        walker.last_call = walker.steps_done
        if result.outcome == LABELLED:
            self.rule.observe(fired["forces"], result.atoms.get_forces(), fired["std"])
            walker.atoms = fired["atoms"]  # go on from the labelled structure, with the updated model
        elif result.outcome == FAILED:
            walker.restarts += 1  # a structure the reference cannot converge: back to the start
            walker.reset(float(self.explore["temperature_K"]), self.seed)
        else:
            walker.done = True  # every structure of this walker has the rejected composition
        walker.done = walker.done or walker.steps_done >= total
        self._set_walkers(walkers, walker)
        self._commit(self._record("explore", f"md walker {walker.index}", result, **values), result.atoms)

    def _trace_path(self, walker: int) -> Path:
        return self.out / "md" / f"walker{walker}.csv"

    def _append_trace(self, walker: int, rows: List[Dict], path: Optional[Path] = None) -> None:
        """Add MD records (steps counted along the walker) to ``md/walker<i>.csv``."""
        path = path or self._trace_path(walker)
        path.parent.mkdir(exist_ok=True)
        new = not path.is_file()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, RECORD_KEYS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def _trim_traces(self) -> None:
        """Drop trace rows beyond the saved walker states (written by a chunk that a kill cut short)."""
        for walker in self.state["walkers"]:
            path = self._trace_path(walker["index"])
            if path.is_file():
                with open(path, newline="") as handle:
                    rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= walker["steps_done"]]
                tmp = path.with_suffix(".tmp")
                tmp.unlink(missing_ok=True)
                self._append_trace(walker["index"], rows, tmp)
                tmp.replace(path)

    def _set_walkers(self, walkers: List[Walker], changed: Walker) -> None:
        self.state["walkers"] = [(changed if w.index == changed.index else w).__dict__ for w in walkers]

    def _pool_graphs(self) -> List:
        if self._pool_cache is None:
            store = FrameStore.for_frames(self.out / "pool.h5", self.pool_frames, self.type_names, self.r_max,
                                          source=self.explore["pool"]["path"])
            self._pool_cache = store.graphs(dtype=self.dtype)
        return self._pool_cache

    def _pool_step(self) -> None:
        """Select a batch from the pool (when none is pending), then label its next candidate."""
        pool = self.state["pool"]
        if not pool["batch"]:
            used = set(pool["used"])
            remaining = [i for i in range(len(self.pool_frames)) if i not in used]
            budget = self.cfg["budget"].get("max_calls")
            k = int(self.explore["batch"])
            if budget is not None:
                k = min(k, budget - self.state["calls"]["explore"])
            graphs = self._pool_graphs()
            with self._timed("explore"):
                forces, stds = pool_uncertainty(self.posterior(), [graphs[i] for i in remaining],
                                                int(self.explore["batch_size"]))
            picks = self.rule.select(stds, forces, k)
            if not picks:
                self.state["stop_reason"] = "no pool candidate fires the rule"
                self._save()
                return
            pool["batch"] = [remaining[j] for j in picks]
            pool["round"] += 1
            self._save()
        i = pool["batch"][0]
        with self._timed("explore"):
            forces, stds = pool_uncertainty(self.posterior(), [self._pool_graphs()[i]])
        values = {"rule": self.rule.kind, "step": pool["round"], **self.rule.values(stds[0], forces[0])}
        result = self._call(self.pool_frames[i], "explore")
        if result.outcome == LABELLED:
            self.rule.observe(forces[0], result.atoms.get_forces(), stds[0])
        pool["used"].append(i)
        pool["batch"].pop(0)
        self._commit(self._record("explore", f"pool[{self.pool_indices[i]}]", result, **values), result.atoms)

    def run(self) -> Dict:
        """Run (or resume) the loop to its end; returns the summary (also written to ``summary.json``)."""
        self._trim_traces()
        if self.state["pending"] is not None:
            log.info("finishing decision %d, interrupted by the last run", self.state["pending"]["record"]["decision"])
            self._finish_pending()
        self._test()
        while self.state["phase"] == "initial":
            self._initial_step()
        while self.state["phase"] == "explore":
            batch_open = self.explore["kind"] == "pool" and self.state["pool"]["batch"]
            if self.state["update"]["count"] == 0 or (self.state["update"]["pending"] and not batch_open):
                self._fit()
            reason = self.state["stop_reason"] or self._stop_reason()
            if reason and not self.state["update"]["pending"]:
                self.state.update(stop_reason=reason, phase="done")
                self._save()
                log.info("active learning stops: %s", reason)
                break
            if self.explore["kind"] == "md":
                self._md_step()
            else:
                self._pool_step()
        summary = summarize(self.state)
        write_json_atomic(summary, self.out / "summary.json")
        return summary


def summarize(state: Dict) -> Dict:
    """Counts, timings and overhead of a loop state (what ``summary.json`` holds).

    ``overhead_s`` = total wall time − reference calls − posterior updates; ``bookkeeping_s`` = the part of it
    that is neither the model's exploration predictions nor test evaluation.
    """
    t = state["timings"]
    overhead = t["total"] - t["oracle"] - t["update"]
    calls = state["calls"]
    n_decisions = state["n_decisions"]
    md_steps = state["md_steps"]
    return {
        "stop_reason": state["stop_reason"],
        "posterior": state["posterior"],
        "calls": calls,
        "n_labelled": state["n_labelled"],
        "n_decisions": n_decisions,
        "updates": state["update"]["count"],
        "md_steps": md_steps,
        "fraction_md_steps_with_call": calls["explore"] / md_steps if md_steps else None,
        "rejected_compositions": state["rejected"],
        "timings_s": dict(t),
        "overhead_s": overhead,
        "bookkeeping_s": overhead - t["explore"] - t["evaluate"],
        "overhead_fraction": overhead / t["total"] if t["total"] else None,
        "bookkeeping_per_decision_s": (overhead - t["explore"] - t["evaluate"]) / n_decisions if n_decisions else None,
        "history": state["history"],
    }


def run_active(config, out_dir=None, overrides: Iterable[str] = (), resume: bool = False,
               oracle: Optional[Oracle] = None) -> Path:
    """Run an active-learning configuration (path or dict); returns the output folder (default
    ``runs/<name>``). With ``resume`` the run in ``out_dir`` continues where it stopped (the budget may be
    changed, nothing else). ``oracle`` replaces the configuration's reference calculator (e.g. an
    :class:`~mlip_uq.active.oracle.Oracle` around an ASE calculator object)."""
    cfg = load_active_config(config, overrides)
    out = Path(out_dir or Path("runs") / cfg["name"])
    ActiveLoop(cfg, out, resume=resume, oracle=oracle).run()
    return out
