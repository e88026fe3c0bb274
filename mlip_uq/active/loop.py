"""The active-learning loop: explore → label with the reference calculator → commit → update the posterior.

``mlip-uq active CONFIG.yaml`` runs :func:`run_active`. A configuration has the sections

- ``oracle`` — the reference calculator (:func:`~mlip_uq.active.oracle.oracle_from_config`);
- ``initial`` — the starting structures ``{path, index, n, labels}``; ``n`` of them are drawn at random (seeded)
  and labelled by the oracle (``labels: oracle``, so that training data and reference agree) or keep the labels
  of the file (``labels: file``);
- ``test`` — optional ``{path, index, n}``: structures labelled once by the oracle; after every update the test
  metrics (docs/design.md names) are added to the history;
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

The configuration is :mod:`mlip_uq.active.config`, the state and its write-ahead commits
:mod:`mlip_uq.active.state` (:class:`~mlip_uq.active.state.LoopState`, :class:`~mlip_uq.active.state.Journal`),
the explorers :mod:`mlip_uq.active.explore` (MD and pool behind one interface; each step is given an
:class:`~mlip_uq.active.explore.ExploreContext`, not the loop, and the explorer's ``state_dict`` is the state's
``explorer`` entry), the posterior updates :mod:`mlip_uq.active.update`; this module is the loop itself.

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

import logging
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import ase
import ase.io
import numpy as np
import torch
from ase.data import atomic_numbers
from nequip.data import AtomicDataDict

from ..calculator import UQCalculator
from ..config import ConfigError, check_resumed_config, dump_config
from ..data import FrameStore, frames_fingerprint
from ..data.splits import validation_picks
from ..evaluate import metrics_and_plots, predict_graphs
from ..files import atomic_write, write_json
from ..posterior import load_posterior
from ..train import model_config_from_data, prepare_data
from .config import ActiveConfig, load_active_config
from .explore import ExploreContext, Explorer, MDExplorer, MDOptions, PoolExplorer, pool_uncertainty
from .oracle import LABELLED, REJECTED, Oracle, OracleResult, oracle_from_config
from .rules import CalibratedRule
from .sources import pick_structures
from .state import Journal, LoopState, composition_key
from .update import Updater

__all__ = ["ActiveLoop", "load_active_config", "run_active", "summarize"]

log = logging.getLogger(__name__)

#: test metrics kept in the history after every update
HISTORY_METRICS = ("energy_mae", "forces_mae", "forces_rmse", "forces_nll", "forces_miscal_area", "forces_spearman")


class ActiveLoop:
    """One active-learning run in ``out``; see the module docstring.

    Args:
        cfg: a configuration from :func:`load_active_config` (a path or mapping is loaded by it).
        out: output folder.
        resume: continue the run in ``out``; without it, ``out`` must not hold a run.
        oracle: the reference calculator; default the one of ``cfg.oracle``.
    """

    def __init__(self, cfg: ActiveConfig, out: Path, resume: bool = False, oracle: Optional[Oracle] = None):
        cfg = cfg if isinstance(cfg, ActiveConfig) else load_active_config(cfg)
        self.cfg, self.out = cfg, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.seed = cfg.seed
        self._check_run(resume)
        self.oracle = oracle or oracle_from_config(cfg.oracle)
        self.rule = cfg.rule.build(seed=self.seed)
        self.initial_frames, initial_indices = pick_structures(cfg.initial, self.seed,
                                                               labelled=cfg.initial.labels == "file")
        self.explorer = self._explorer(initial_indices)
        self.explorer.check_rule(self.rule)
        if (self.out / "state.json").is_file():
            self.state = LoopState.read(self.out / "state.json")
            if self.state.phase == "done":  # resumed after its end, e.g. with a larger budget
                self.state.phase, self.state.stop_reason = "explore", None
            self.explorer.load_state_dict(self.state.explorer)
        else:
            self.state = LoopState(initial={"indices": initial_indices, "next": 0}, rule=self.rule.state_dict(),
                                   explorer=self.explorer.state_dict())
        self.rule.load_state_dict(self.state.rule)
        self.journal = Journal(self.out, self.state, self.rule, self.type_names, self.r_max, self.explorer)
        self._posterior = self._calculator = self._prepared = self._test_graphs = self.updater = None

    # ------------------------------------------------------------------ setup
    def _check_run(self, resume: bool) -> None:
        saved = self.out / "active_config.yaml"
        if not resume:
            if (self.out / "state.json").is_file():
                raise ConfigError(f"{self.out} already holds an active-learning run; resume it (--resume) or "
                                  "choose another output folder")
            for name in ("test.h5", "labelled.h5", "decisions.jsonl", "initial.extxyz"):
                (self.out / name).unlink(missing_ok=True)  # left by a start killed before its first state
        else:  # a resumed run may be given another budget
            check_resumed_config(saved, self.cfg, load_active_config, ["budget"], "active-learning run",
                                 allowed="the budget")
        dump_config(self.cfg, saved)

    def _explorer(self, initial_indices: List[int]) -> Explorer:
        """The explorer of ``cfg.explore``; also sets the element names, cutoff and dtype of the stores and the
        training configuration of the loop's posterior (``train_cfg``, ``settings``, ``update_options``)."""
        cfg, options = self.cfg, self.cfg.explore
        if isinstance(options, MDOptions):
            frames, indices = pick_structures(options.starts, self.seed)[0], []
        else:
            pool, initial = options.pool, cfg.initial
            same = pool.path == initial.path and pool.index == initial.index
            frames, indices = pick_structures(pool, self.seed + 1, exclude=initial_indices if same else ())
        model = cfg.train.model
        structures = self.initial_frames + frames
        self.type_names = model.type_names or sorted(
            {s for a in structures for s in a.get_chemical_symbols()}, key=lambda s: atomic_numbers[s])
        self.train_cfg = cfg.train_config(self.out, self.type_names)
        self.settings, self.update_options = self.train_cfg.settings, cfg.update
        self.r_max = float(model.config.r_max)
        self.dtype = getattr(torch, model.config.dtype)
        if isinstance(options, MDOptions):
            return MDExplorer(options, frames, self.seed, self.out)
        return PoolExplorer(options, frames, indices, self.out, self.type_names, self.r_max, self.dtype)

    # ------------------------------------------------------------------ oracle
    def call(self, atoms: ase.Atoms, phase: str) -> OracleResult:
        """Label ``atoms`` unless its composition was rejected before (then a ``rejected`` result, no call)."""
        key, rejected = composition_key(atoms), self.state.rejected
        if key in rejected:
            return OracleResult(REJECTED, 0.0, message=f"composition {key} rejected before: {rejected[key]}",
                                called=False)
        with self.journal.timed("oracle"):
            result = self.oracle.label(atoms)
        if result.called:
            self.state.calls[phase] += 1
        if result.outcome == REJECTED:
            rejected[key] = result.message
        return result

    def record(self, phase: str, source: str, result: OracleResult, **values) -> Dict:
        """The decision-log record of a labelling decision (logged as it is made)."""
        record = {"phase": phase, "source": source, **values, "outcome": result.outcome,
                  "called": result.called, "call_s": round(result.seconds, 6), "message": result.message,
                  "n_calls": self.state.n_calls}
        level = logging.WARNING if result.outcome != LABELLED else logging.INFO
        detail = f" ({result.message})" if result.message else ""
        uncertainty = f", max force std {values['uncertainty']:.3g} eV/Å" if "uncertainty" in values else ""
        log.log(level, "%s %s%s: %s in %.3f s%s", phase, source, uncertainty, result.outcome, result.seconds, detail)
        return record

    def explore_context(self) -> ExploreContext:
        """What the explorer's next step may use of the loop (:class:`~mlip_uq.active.explore.ExploreContext`)."""
        max_calls = self.cfg.budget.max_calls
        return ExploreContext(
            rule=self.rule, posterior=self.posterior, calculator=self.calculator,
            call=lambda atoms: self.call(atoms, "explore"),
            commit=lambda source, result, **values: self.journal.commit(
                self.record("explore", source, result, **values), result.atoms),
            save=self.journal.save, timed=lambda: self.journal.timed("explore"),
            calls_left=None if max_calls is None else max_calls - self.state.calls["explore"])

    # ------------------------------------------------------------------ data
    def _test(self) -> List:
        """Test graphs, labelled by the oracle once (``test.h5``); [] without a test section."""
        if self.cfg.test is None:
            return []
        if self._test_graphs is None:
            path = self.out / "test.h5"
            if not path.is_file():
                frames, _ = pick_structures(self.cfg.test, self.seed + 2)
                labelled = []
                for i, atoms in enumerate(frames):
                    result = self.call(atoms, "test")
                    if result.outcome == LABELLED:
                        labelled.append(result.atoms)
                    else:
                        log.warning("test structure %d: %s (%s)", i, result.outcome, result.message)
                if not labelled:
                    raise RuntimeError("no test structure could be labelled by the oracle")
                FrameStore.create(path, labelled, self.type_names, self.r_max, source=self.cfg.test.path)
                self.journal.save()
                log.info("test set: %d structures labelled by %s", len(labelled), self.oracle.name)
            self._test_graphs = FrameStore.open(path).graphs(dtype=self.dtype)
        return self._test_graphs

    def _data(self):
        """(prepared initial data, model config); the initial set goes through ``prepare_data``."""
        if self._prepared is None:
            path = self.out / "initial.extxyz"
            if not path.is_file():
                frames = FrameStore.open(self.journal.store_path).atoms(list(range(self.state.n_initial_labelled)))
                with atomic_write(path) as tmp:
                    ase.io.write(tmp, frames, format="extxyz")
            work = self.out / "model"
            work.mkdir(exist_ok=True)
            prepared = prepare_data(self.train_cfg, work)
            model_config = model_config_from_data(self.train_cfg, prepared)
            self._prepared = (prepared, model_config)
            self.updater = Updater(self.train_cfg.method, model_config, self.settings, self.update_options, work,
                                   self.train_cfg.to_dict())
        return self._prepared

    def _training_sets(self):
        """(train, val): the initial split, and the structures labelled since then divided at the initial split's
        validation fraction (:func:`~mlip_uq.data.splits.validation_picks`), so that early stopping and the noise
        fit of an update see the explored distribution, not only the initial one."""
        prepared, _ = self._data()
        new = list(range(self.state.n_initial_labelled, self.state.n_labelled))
        graphs = FrameStore.open(self.journal.store_path).graphs(new, dtype=self.dtype) if new else []
        to_val = validation_picks(len(graphs), len(prepared.val) / (len(prepared.train) + len(prepared.val)))
        return (prepared.train + [g for g, v in zip(graphs, to_val) if not v],
                prepared.val + [g for g, v in zip(graphs, to_val) if v])

    def training_sets(self) -> tuple[List, List]:
        """(train, val): the lists of graphs the next posterior fit or update trains and validates on (the initial
        split plus the structures labelled since, as the loop's own fits take them)."""
        return self._training_sets()

    def test_graphs(self) -> List:
        """The test set's graphs (``test.h5``, labelled by the oracle on first use); [] without a ``test`` section."""
        return self._test()

    def energy_references(self) -> Dict[str, float]:
        """Per-element reference energies (eV) of the initial data, as the loop's fits record them."""
        return dict(self._data()[0].energy_references)

    def posterior(self):
        """The current posterior (loaded once per update)."""
        if self._posterior is None:
            self._posterior = load_posterior(self.out / self.state.posterior)
        return self._posterior

    def calculator(self):
        """An ASE calculator of the current posterior."""
        if self._calculator is None:
            self._calculator = UQCalculator(self.posterior())
        return self._calculator

    # ------------------------------------------------------------------ phases
    def _initial_step(self) -> None:
        initial = self.state.initial
        i = initial["next"]
        if i >= len(initial["indices"]):
            if self.state.n_labelled == 0:
                raise RuntimeError("no structure of the initial set could be labelled by the oracle")
            self.state.n_initial_labelled = self.state.n_labelled
            self.state.phase = "explore"
            self.journal.save()
            return
        atoms = self.initial_frames[i]
        initial["next"] = i + 1
        if self.cfg.initial.labels == "file":
            result = OracleResult(LABELLED, 0.0, atoms=atoms, called=False)
        else:
            result = self.call(atoms, "initial")
        record = self.record("initial", f"initial[{initial['indices'][i]}]", result, rule="initial")
        self.journal.commit(record, result.atoms)

    def _fit(self) -> None:
        """Fit (first) or update the posterior on every labelled structure, then evaluate on the test set."""
        state, update = self.state, self.state.update
        index, resume = update["count"], update["started"]
        train, val = self._training_sets()
        prepared, _ = self._data()
        update["started"] = True
        self.journal.save()
        metadata = dict(energy_references=prepared.energy_references,
                        data_fingerprint=frames_fingerprint(FrameStore.open(self.journal.store_path).atoms()))
        log.info("posterior %s %d on %d structures", "update" if index else "fit", index, len(train) + len(val))
        start = time.perf_counter()
        with self.journal.timed("update"):
            path = self.updater.fit(train, val, index, resume, metadata)
        seconds = time.perf_counter() - start
        self._posterior = self._calculator = None
        state.posterior = str(path.relative_to(self.out))
        self._check_posterior(train + val, index)
        metrics = {}
        if self._test():
            with self.journal.timed("evaluate"):
                pred = predict_graphs(self.posterior(), self._test(), self.train_cfg.evaluate.batch_size)
                metrics = {k: v for k, v in metrics_and_plots(pred).items() if k in HISTORY_METRICS}
        entry = {"update": index, "n_labelled": state.n_labelled, "n_train": len(train) + len(val),
                 "n_val": len(val), "calls_initial": state.calls["initial"], "calls_explore": state.calls["explore"],
                 "md_steps": state.md_steps, "update_s": seconds, **metrics}
        if isinstance(self.rule, CalibratedRule):
            entry["calibration_scale"] = self.rule.scale
        state.history.append(entry)
        state.update = {"count": index + 1, "pending": False, "started": False}
        self.journal.save()
        if metrics:
            log.info("after %d reference calls: test forces MAE %.4f eV/Å, energy MAE %.4f eV/atom",
                     entry["calls_initial"] + entry["calls_explore"], metrics["forces_mae"], metrics["energy_mae"])

    def _check_posterior(self, graphs: List, index: int) -> None:
        """Predict the training structures with the new posterior: every force and std must be finite (a sampler
        chain that diverged between two samples leaves a sample with huge parameters). With ``prior_scale:
        initial`` the calibrated rule takes its s₀ from these residuals."""
        with self.journal.timed("evaluate"):
            forces, stds, _ = pool_uncertainty(self.posterior(), graphs)
        forces, stds = np.concatenate(forces), np.concatenate(stds)
        if not (np.isfinite(forces).all() and np.isfinite(stds).all()):
            raise RuntimeError(
                f"the posterior of {'update' if index else 'fit'} {index} ({self.out / self.state.posterior}) "
                "predicts NaN/inf forces on its own training structures: a sample of a diverged chain or member "
                "(for SG-MCMC: lower sgmcmc.lr). The loop cannot go on with it.")
        if isinstance(self.rule, CalibratedRule) and self.rule.needs_prior:
            true = np.concatenate([g[AtomicDataDict.FORCE_KEY].double().numpy() for g in graphs])
            self.rule.set_prior(forces, true, stds)
            log.info("calibrated rule: prior std scale %.3g from the residuals of the %d training structures",
                     self.rule.prior_scale, len(graphs))

    def _stop_reason(self) -> Optional[str]:
        budget, history = self.cfg.budget, self.state.history
        target = budget.target_forces_mae
        if target is not None and history and history[-1].get("forces_mae", np.inf) <= target:
            return f"target reached: test forces MAE {history[-1]['forces_mae']:.4g} <= {target} eV/Å"
        if budget.max_calls is not None and self.state.calls["explore"] >= budget.max_calls:
            return f"budget used: {self.state.calls['explore']} reference calls"
        return self.explorer.stop_reason()

    def run(self) -> Dict:
        """Run (or resume) the loop to its end; returns the summary (also written to ``summary.json``)."""
        state = self.state
        self.explorer.resume()
        if state.pending is not None:
            log.info("finishing decision %d, interrupted by the last run", state.pending["record"]["decision"])
            self.journal.finish_pending()
        self._test()
        while state.phase == "initial":
            self._initial_step()
        while state.phase == "explore":
            if state.update["count"] == 0 or (state.update["pending"] and not self.explorer.batch_open()):
                self._fit()
            reason = state.stop_reason or self._stop_reason()
            if reason and not state.update["pending"]:
                state.stop_reason, state.phase = reason, "done"
                self.journal.save()
                log.info("active learning stops: %s", reason)
                break
            reason = self.explorer.step(self.explore_context())
            if reason:  # the explorer found out that exploration is over
                state.stop_reason = reason
                self.journal.save()
        summary = summarize(state)
        write_json(summary, self.out / "summary.json")
        return summary


def summarize(state: LoopState) -> Dict:
    """Counts, timings and overhead of a loop state (what ``summary.json`` holds).

    ``overhead_s`` = total wall time − reference calls − posterior updates; ``bookkeeping_s`` = the part of it
    that is neither the model's exploration predictions nor test evaluation.
    """
    t = state.timings
    overhead = t["total"] - t["oracle"] - t["update"]
    calls, n_decisions, md_steps = state.calls, state.n_decisions, state.md_steps
    return {
        "stop_reason": state.stop_reason,
        "posterior": state.posterior,
        "calls": calls,
        "n_labelled": state.n_labelled,
        "n_decisions": n_decisions,
        "updates": state.update["count"],
        "md_steps": md_steps,
        "fraction_md_steps_with_call": calls["explore"] / md_steps if md_steps else None,
        "rejected_compositions": state.rejected,
        "timings_s": dict(t),
        "overhead_s": overhead,
        "bookkeeping_s": overhead - t["explore"] - t["evaluate"],
        "overhead_fraction": overhead / t["total"] if t["total"] else None,
        "bookkeeping_per_decision_s": (overhead - t["explore"] - t["evaluate"]) / n_decisions if n_decisions else None,
        "history": state.history,
    }


def run_active(config, out_dir=None, overrides: Iterable[str] = (), resume: bool = False,
               oracle: Optional[Oracle] = None) -> Path:
    """Run an active-learning configuration (path, dict or :class:`~mlip_uq.active.config.ActiveConfig`); returns the output folder (default
    ``runs/<name>``). With ``resume`` the run in ``out_dir`` continues where it stopped (the budget may be
    changed, nothing else). ``oracle`` replaces the configuration's reference calculator (e.g. an
    :class:`~mlip_uq.active.oracle.Oracle` around an ASE calculator object)."""
    cfg = load_active_config(config, overrides)
    out = Path(out_dir or Path("runs") / cfg.name)
    ActiveLoop(cfg, out, resume=resume, oracle=oracle).run()
    return out
