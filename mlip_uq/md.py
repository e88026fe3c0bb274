"""Uncertainty-aware molecular dynamics: ASE dynamics driven by a :class:`~mlip_uq.UQCalculator`, its
uncertainty checked every ``uq_every`` steps.

:func:`run_md` runs one of ASE's integrators (``nve``: Velocity Verlet; ``langevin``: Langevin; ``npt``: ASE's
isotropic Martyna–Tobias–Klein barostat with Nose–Hoover chains). Which signal is read when:

- **every step** (cheap: the calculator's K tail passes, no per-sample pull-back): the predictive mean potential
  energy, the temperature, the total-energy std ``energy_std`` and its epistemic part (the spread of the samples,
  without the model's observation noise, which the total includes), and the largest and mean per-atom energy std
  (``energies_std``, eV), recorded as ``energy_std``, ``energy_std_epistemic``, ``max_atom_energy_std``,
  ``mean_atom_energy_std``;
- **every ``uq_every`` steps** (an *uncertainty check*, at steps 0, uq_every, 2 uq_every, ...; K pull-backs):
  the per-atom force std (``atom_force_std``, the calculator's key: sqrt of the sum of an atom's three
  force-component variances, eV/Å), recorded as ``max_atom_force_std`` and ``mean_atom_force_std``, and the
  largest epistemic part ``max_atom_force_std_epistemic`` (NaN in the records of the steps between checks). The stop rule (:class:`ForceStdRule`, or any object with the same
  ``check`` method) reads it, so it is tested at the checks only, and the active-learning trigger (the rule
  passed by :mod:`mlip_uq.active`) likewise reads the latest check.

The rule *fires* at a check when its ``check`` has been true for ``consecutive`` checks in a row, up to and
including that one (and at every later check while it stays true); with ``uq_every = 1`` checks are steps. An MD
step between checks costs one model pull-back (the mean forces); a check costs K - 1 more. When the rule fires,
``on_uncertain(step, atoms, record)`` is called if given (the run stops if it returns True) and otherwise the
run stops. Because the trajectory does not depend on ``uq_every`` (the dynamics read the same mean forces), a
run with ``uq_every = n`` stops at the first multiple of n at which the every-step run's rule would fire.

With ``out_dir`` the run leaves ``trajectory.extxyz`` (positions, means and the per-atom uncertainties computed
at that step, via :func:`~mlip_uq.calculator.uq_to_atoms`, plus ``step`` and ``time_fs`` in each frame's info),
``md_log.csv`` (one row per logged step, the record keys as columns) and ``uncertainty.png`` (the uncertainty
trace against time). Trajectory and log are written to ``trajectory.extxyz.partial`` and ``md_log.csv.partial``,
each frame and row flushed as it is written, and renamed into place when the run ends (finished, stopped by the
rule, or collapsed: a step that moves two atoms closer than the calculator accepts ends the run as a result,
``MDResult.collapsed``, while a start it refuses raises): a run that fails or is killed leaves the files of an
earlier run in ``out_dir`` as they were, and its own frames and rows, up to the last one written, in the
``.partial`` files (``ase.io.read(..., format="extxyz")`` reads the trajectory's).
"""

from __future__ import annotations

import csv
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import ase
import ase.io
import numpy as np
from ase import units
from ase.md.langevin import Langevin
from ase.md.nose_hoover_chain import IsotropicMTKNPT
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet

from .calculator import CollapsedAtomsError, uq_to_atoms
from .result_keys import (
    ATOM_FORCE_STD,
    ATOM_FORCE_STD_EPISTEMIC,
    ENERGIES_STD,
    ENERGY,
    ENERGY_STD,
    ENERGY_STD_EPISTEMIC,
    FORCES,
)
from .uq.plots import new_figure as _new_figure
from .uq.plots import save_figure as _save
from .uq.signals import SIGNALS, check_signal, signal_from_results

log = logging.getLogger(__name__)

ENSEMBLES = ("nve", "langevin", "npt")
#: keys of every per-step record (and columns of md_log.csv)
RECORD_KEYS = ("step", "time_fs", "energy", "kinetic_energy", "temperature_K", "energy_std", "energy_std_epistemic",
               "max_atom_energy_std", "mean_atom_energy_std", "max_atom_force_std", "mean_atom_force_std",
               "max_atom_force_std_epistemic")


@dataclass
class ForceStdRule:
    """Flags a structure whose largest per-atom force uncertainty is above a threshold.

    Args:
        threshold: in eV/Å, or dimensionless with ``relative``.
        relative: compare max_i std_i / (|F_i| + eps) instead of max_i std_i, where std_i is atom i's
            ``atom_force_std`` (eV/Å) and |F_i| the norm of its predicted mean force (eV/Å).
        consecutive: the rule fires only after ``check`` is true at this many consecutive uncertainty checks
            (MD steps with ``uq_every = 1``).
        eps: force floor of the relative test (eV/Å), so that an atom near equilibrium (|F_i| ≈ 0) is judged by
            std_i / eps instead of a ratio that diverges; default 0.1 eV/Å.
        signal: which per-atom uncertainty std_i is (:mod:`mlip_uq.uq.signals`): ``total`` (the default: a
            stop asks how large the force error is likely to be, so it reads the full predictive std),
            ``epistemic`` (the spread of the samples alone) or ``bald`` (dimensionless; not with ``relative``).
            The caller passes that signal to :meth:`check`; :func:`run_md` does.
    """

    threshold: float
    relative: bool = False
    consecutive: int = 1
    eps: float = 0.1
    signal: str = "total"

    def __post_init__(self):
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {self.threshold}")
        if int(self.consecutive) != self.consecutive or self.consecutive < 1:
            raise ValueError(f"consecutive must be a positive integer, got {self.consecutive}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0 eV/Å, got {self.eps}")
        check_signal(self.signal)
        if self.relative and self.signal == "bald":
            raise ValueError("a relative threshold divides a std by the force; signal bald is no std")
        self.consecutive = int(self.consecutive)

    def measure(self, atom_force_std: np.ndarray, forces: np.ndarray) -> float:
        """The number compared with the threshold: max_i std_i (eV/Å), or max_i std_i / (|F_i| + eps); std_i
        the rule's :attr:`signal` of atom i."""
        std = np.asarray(atom_force_std, dtype=np.float64)
        if self.relative:
            std = std / (np.linalg.norm(np.asarray(forces, dtype=np.float64), axis=-1) + self.eps)
        return float(np.max(std))

    def check(self, atom_force_std: np.ndarray, forces: np.ndarray) -> bool:
        """True when this structure is above the threshold.

        Args:
            atom_force_std: (N,) the rule's per-atom signal (:attr:`signal`: eV/Å, nats for ``bald``).
            forces: (N, 3) predicted mean forces (eV/Å).
        """
        return self.measure(atom_force_std, forces) > self.threshold

    def describe(self) -> str:
        name = {"total": ATOM_FORCE_STD, "epistemic": ATOM_FORCE_STD_EPISTEMIC, "bald": "bald"}[self.signal]
        quantity = f"max_i {name}_i / (|F_i| + {self.eps:g} eV/Å)" if self.relative else f"max {name}"
        unit = "" if self.relative else f" {SIGNALS[self.signal]}"
        return f"{quantity} > {self.threshold:g}{unit} for {self.consecutive} consecutive check(s)"


@dataclass
class MDResult:
    """What :func:`run_md` did.

    Attributes:
        steps_done: MD steps integrated (the last record's step).
        stopped: whether the run ended before ``steps`` (stop rule, ``on_uncertain``, or collapsed atoms).
        stop_reason: why it stopped, or None.
        collapsed: the dynamics moved two atoms closer than the calculator accepts
            (:class:`~mlip_uq.calculator.CollapsedAtomsError`) during step ``steps_done + 1``: the run ended there,
            ``atoms`` holds the collapsed positions.
        records: one dict per logged step with the keys :data:`RECORD_KEYS` (units: fs, eV, K, eV/Å; the force
            stds are NaN at steps without an uncertainty check).
        checks: uncertainty checks made (steps at which ``atom_force_std`` was computed).
        trajectory_path, log_path, plot_path: the files written (None without ``out_dir``).
    """

    steps_done: int
    stopped: bool
    stop_reason: Optional[str]
    collapsed: bool = False
    records: List[Dict] = field(default_factory=list)
    checks: int = 0
    trajectory_path: Optional[Path] = None
    log_path: Optional[Path] = None
    plot_path: Optional[Path] = None


def _dynamics(atoms: ase.Atoms, ensemble: str, timestep_fs: float, temperature_K: float, friction: float,
              pressure_GPa: float, rng: np.random.Generator):
    dt = timestep_fs * units.fs
    if ensemble == "nve":
        return VelocityVerlet(atoms, dt)
    if ensemble == "langevin":
        # fixcm=False: ASE's fixcm=True does not sample the NVT distribution exactly (ASE >= 3.28 warns)
        return Langevin(atoms, dt, temperature_K=temperature_K, friction=friction / units.fs, fixcm=False, rng=rng)
    if not atoms.pbc.all():
        raise ValueError(f"ensemble npt needs a cell periodic in all three directions, got pbc={atoms.pbc.tolist()}")
    # damping times: ASE's suggestions, 100 and 1000 time steps
    return IsotropicMTKNPT(atoms, dt, temperature_K=temperature_K, pressure_au=pressure_GPa * units.GPa,
                           tdamp=100 * dt, pdamp=1000 * dt)


def _record(step: int, atoms: ase.Atoms, timestep_fs: float, check: bool) -> Dict:
    """The step's record; ``check`` computes the force uncertainty (per-sample forces) for it."""
    calc = atoms.calc
    energies_std = calc.get_property(ENERGIES_STD, atoms)
    force_std = calc.get_property(ATOM_FORCE_STD, atoms) if check else np.full(1, np.nan)
    epistemic = calc.get_property(ATOM_FORCE_STD_EPISTEMIC, atoms) if check else np.full(1, np.nan)
    return {
        "step": step,
        "time_fs": step * timestep_fs,
        "energy": float(calc.get_property(ENERGY, atoms)),
        "kinetic_energy": float(atoms.get_kinetic_energy()),
        "temperature_K": float(atoms.get_temperature()),
        "energy_std": float(calc.get_property(ENERGY_STD, atoms)),
        "energy_std_epistemic": float(calc.get_property(ENERGY_STD_EPISTEMIC, atoms)),
        "max_atom_energy_std": float(np.max(energies_std)),
        "mean_atom_energy_std": float(np.mean(energies_std)),
        "max_atom_force_std": float(np.max(force_std)),
        "mean_atom_force_std": float(np.mean(force_std)),
        "max_atom_force_std_epistemic": float(np.max(epistemic)),
    }


def _steps_until_collapse(dyn, steps: int, result: MDResult):
    """``dyn.irun(steps)``, ended (``result.collapsed``) by a step that moves two atoms closer than the calculator
    accepts; a start the calculator refuses is bad input and raises."""
    run = dyn.irun(steps)
    yield next(run)  # step 0: the starting structure's forces
    while True:
        try:
            yield next(run)
        except StopIteration:
            return
        except CollapsedAtomsError as error:
            result.stopped, result.collapsed = True, True
            result.stop_reason = f"atoms collapsed during step {dyn.nsteps + 1}: {error}"
            return


def run_md(
    atoms: ase.Atoms,
    calculator,
    steps: int,
    timestep_fs: float = 1.0,
    temperature_K: float = 300.0,
    ensemble: str = "langevin",
    out_dir=None,
    stop_rule=None,
    on_uncertain: Optional[Callable[[int, ase.Atoms, Dict], bool]] = None,
    log_every: int = 1,
    friction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    pressure_GPa: float = 0.0,
    uq_every: int = 1,
) -> MDResult:
    """Run uncertainty-aware MD on ``atoms`` (module docstring); ``atoms`` is moved along in place.

    Args:
        atoms: the starting structure. Its momenta are kept when it has any; otherwise velocities are drawn
            from the Maxwell–Boltzmann distribution at ``temperature_K`` (centre-of-mass motion removed).
        calculator: a :class:`~mlip_uq.UQCalculator` (attached to ``atoms``).
        steps: number of MD steps.
        timestep_fs: time step (fs).
        temperature_K: target temperature (K) of ``langevin`` and ``npt``, and of the initial velocities.
        ensemble: ``"nve"``, ``"langevin"`` or ``"npt"``.
        out_dir: folder for trajectory, log and plot; None writes nothing.
        stop_rule: a :class:`ForceStdRule`, or any object with ``check(signal, forces) -> bool`` (and
            optionally ``consecutive`` and ``signal``, the name of the per-atom signal it reads,
            :mod:`mlip_uq.uq.signals`; default ``total``: ``atom_force_std``), tested at every uncertainty check.
        on_uncertain: ``f(step, atoms, record) -> bool`` called whenever the rule fires (at a check, so
            ``atoms.calc.results`` holds ``atom_force_std``); True stops the run.
        log_every: record, log and write a trajectory frame every this many steps (and at the last step and
            every step where the rule fires).
        friction: Langevin friction (1/fs).
        seed: seed of the initial velocities and the Langevin noise.
        progress: log progress about 20 times over the run.
        pressure_GPa: external pressure of ``npt`` (GPa).
        uq_every: check the force uncertainty (and test the stop rule) every this many steps, from step 0
            (module docstring); 1 checks every step.

    Returns:
        An :class:`MDResult`.
    """
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not timestep_fs > 0 or int(log_every) < 1:
        raise ValueError(f"need timestep_fs > 0 and log_every >= 1, got {timestep_fs} and {log_every}")
    if not temperature_K >= 0:
        raise ValueError(f"temperature_K must be >= 0 K, got {temperature_K}")
    if int(uq_every) != uq_every or uq_every < 1:
        raise ValueError(f"uq_every must be a positive integer (steps), got {uq_every}")
    uq_every = int(uq_every)
    steps = int(steps)
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    if not atoms.get_momenta().any() and temperature_K > 0:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
        Stationary(atoms)
    dyn = _dynamics(atoms, ensemble, timestep_fs, temperature_K, friction, pressure_GPa, rng)
    needed = int(getattr(stop_rule, "consecutive", 1))
    result = MDResult(steps_done=0, stopped=False, stop_reason=None)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result.trajectory_path, result.log_path = out_dir / "trajectory.extxyz", out_dir / "md_log.csv"
    keep_graph = getattr(calculator, "keep_trunk_graph", None)
    streak, start, report_every = 0, time.perf_counter(), max(1, steps // 20)
    latest_check = (float("nan"), 0)  # (max atom_force_std, step) of the latest uncertainty check
    partial = {}
    with ExitStack() as files:
        if keep_graph is not None:  # keep the trunk's graph only for the steps that check the force uncertainty
            files.callback(setattr, calculator, "keep_trunk_graph", keep_graph)
            calculator.keep_trunk_graph = True  # step 0 is a check
        if out_dir is not None:
            partial = {path: path.with_name(path.name + ".partial") for path in (result.trajectory_path,
                                                                                  result.log_path)}
            trajectory = files.enter_context(open(partial[result.trajectory_path], "w"))
            log_file = files.enter_context(open(partial[result.log_path], "w", newline=""))
            table = csv.DictWriter(log_file, RECORD_KEYS)
            table.writeheader()
        for _ in _steps_until_collapse(dyn, steps, result):
            step = dyn.nsteps
            check = step % uq_every == 0
            if keep_graph is not None:
                calculator.keep_trunk_graph = (step + 1) % uq_every == 0  # for the next step's forces
            record = _record(step, atoms, timestep_fs, check)
            result.checks += check
            if check:
                latest_check = (record["max_atom_force_std"], step)
            fires = False
            if stop_rule is not None and check:
                results = atoms.calc.results
                signal = signal_from_results(results, getattr(stop_rule, "signal", "total"))
                streak = streak + 1 if stop_rule.check(signal, results[FORCES]) else 0
                fires = streak >= needed
            if step % int(log_every) == 0 or step == steps or fires:
                result.records.append(record)
                if out_dir is not None:
                    uq_to_atoms(atoms, compute_missing=False)
                    atoms.info.update(step=step, time_fs=record["time_fs"])
                    ase.io.write(trajectory, atoms, format="extxyz")
                    trajectory.flush()
                    table.writerow(record)  # after its frame: every row of the log has its frame
                    log_file.flush()
            if progress and (step % report_every == 0 or step == steps):
                rate = step / max(time.perf_counter() - start, 1e-9)
                log.info("md step %d/%d (%.0f%%), %.2f steps/s, T %.0f K, energy std %.4g eV, max atom force std "
                         "%.4g eV/Å (check at step %d)", step, steps, 100 * step / max(steps, 1), rate,
                         record["temperature_K"], record["energy_std"], *latest_check)
            result.steps_done = step
            if fires:
                describe = stop_rule.describe() if hasattr(stop_rule, "describe") else type(stop_rule).__name__
                reason = f"stop rule fired at step {step} ({describe}; max atom_force_std " \
                         f"{record['max_atom_force_std']:.4g} eV/Å)"
                if on_uncertain is None or on_uncertain(step, atoms, record):
                    if on_uncertain is not None:
                        reason += ": on_uncertain asked to stop"
                    result.stopped, result.stop_reason = True, reason
                    break
    for path, written in partial.items():  # the run ended normally: its files replace an earlier run's
        written.replace(path)
    if out_dir is not None and result.records:
        threshold = getattr(stop_rule, "threshold", None) if not getattr(stop_rule, "relative", False) else None
        result.plot_path = uncertainty_trace_plot(result.records, out_dir / "uncertainty.png", threshold=threshold,
                                                  n_atoms=len(atoms))
    if progress:
        log.info("md: %d steps in %.1f s%s", result.steps_done, time.perf_counter() - start,
                 f"; stopped: {result.stop_reason}" if result.stopped else "")
    return result


def uncertainty_trace_plot(records: List[Dict], path, threshold: Optional[float] = None,
                           n_atoms: Optional[int] = None) -> Path:
    """PNG of the uncertainty trace against time: max and mean per-atom force std at the uncertainty checks
    (eV/Å, with the stop threshold when given), energy std (meV/atom with ``n_atoms``, else meV) and the largest
    per-atom energy std (meV) at every recorded step, and temperature (K)."""
    t = np.array([r["time_fs"] for r in records]) / 1000.0
    checked = [i for i, r in enumerate(records) if np.isfinite(r["max_atom_force_std"])]
    fig = _new_figure(7.0, 6.5)
    ax_f, ax_e, ax_t = fig.subplots(3, 1, sharex=True)
    style = dict(marker="." if len(checked) < len(records) else None)
    ax_f.plot(t[checked], [records[i]["max_atom_force_std"] for i in checked], label="max over atoms", color="C3",
              **style)
    ax_f.plot(t[checked], [records[i]["mean_atom_force_std"] for i in checked], label="mean over atoms", color="C0",
              **style)
    ax_f.plot(t[checked], [records[i]["max_atom_force_std_epistemic"] for i in checked], color="C3", linestyle=":",
              label="max over atoms, epistemic part", **style)
    if threshold is not None:
        ax_f.axhline(threshold, color="k", linestyle="--", linewidth=1, label=f"stop threshold {threshold:g}")
    ax_f.set_ylabel("atom force std (eV/Å)")
    ax_f.legend(loc="best", fontsize=8)
    scale = 1000.0 / (n_atoms or 1)
    ax_e.plot(t, [scale * r["energy_std"] for r in records], color="C2",
              label="total energy std" + (" / atoms" if n_atoms else ""))
    ax_e.plot(t, [scale * r["energy_std_epistemic"] for r in records], color="C2", linestyle=":",
              label="its epistemic part")
    ax_e.plot(t, [1000.0 * r["max_atom_energy_std"] for r in records], color="C4", label="max per-atom energy std")
    ax_e.set_ylabel("meV/atom" if n_atoms else "meV")
    ax_e.legend(loc="best", fontsize=8)
    ax_t.plot(t, [r["temperature_K"] for r in records], color="C1")
    ax_t.set_ylabel("temperature (K)")
    ax_t.set_xlabel("time (ps)")
    ax_f.set_title("uncertainty along the MD trajectory")
    return _save(fig, path)
