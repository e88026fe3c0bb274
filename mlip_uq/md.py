"""Uncertainty-aware molecular dynamics: ASE dynamics driven by a :class:`~mlip_uq.UQCalculator`, watched at
every step.

:func:`run_md` runs one of ASE's integrators (``nve``: Velocity Verlet; ``langevin``: Langevin; ``npt``: ASE's
isotropic Martyna–Tobias–Klein barostat with Nose–Hoover chains) and records at each step the predictive mean
potential energy, the temperature, the total-energy std and the largest and mean per-atom force std
(``atom_force_std``, the calculator's key: sqrt of the sum of an atom's three force-component variances, eV/Å).
A stop rule (:class:`ForceStdRule`, or any object with the same ``check`` method) is tested at every step
including the starting structure (step 0). It *fires* at a step when its ``check`` has been true for
``consecutive`` steps in a row, up to and including that one (and at every later step while it stays true).
When it fires, ``on_uncertain(step, atoms, record)`` is called if given (the run stops if it returns True) and
otherwise the run stops.

With ``out_dir`` the run leaves ``trajectory.extxyz`` (positions, means and per-atom uncertainties, via
:func:`~mlip_uq.calculator.uq_to_atoms`, plus ``step`` and ``time_fs`` in each frame's info), ``md_log.csv``
(one row per logged step, the record keys as columns) and ``uncertainty.png`` (the uncertainty trace against
time).
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

from .calculator import uq_to_atoms
from .uq.plots import new_figure as _new_figure, save_figure as _save

log = logging.getLogger(__name__)

ENSEMBLES = ("nve", "langevin", "npt")
#: keys of every per-step record (and columns of md_log.csv)
RECORD_KEYS = ("step", "time_fs", "energy", "kinetic_energy", "temperature_K", "energy_std",
               "max_atom_force_std", "mean_atom_force_std")


@dataclass
class ForceStdRule:
    """Flags a structure whose largest per-atom force uncertainty is above a threshold.

    Args:
        threshold: in eV/Å, or dimensionless with ``relative``.
        relative: compare max_i std_i / (|F_i| + eps) instead of max_i std_i, where std_i is atom i's
            ``atom_force_std`` (eV/Å) and |F_i| the norm of its predicted mean force (eV/Å).
        consecutive: the rule fires only after ``check`` is true at this many consecutive MD steps.
        eps: force floor of the relative test (eV/Å), so that an atom near equilibrium (|F_i| ≈ 0) is judged by
            std_i / eps instead of a ratio that diverges; default 0.1 eV/Å.
    """

    threshold: float
    relative: bool = False
    consecutive: int = 1
    eps: float = 0.1

    def __post_init__(self):
        if not (np.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {self.threshold}")
        if int(self.consecutive) != self.consecutive or self.consecutive < 1:
            raise ValueError(f"consecutive must be a positive integer, got {self.consecutive}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0 eV/Å, got {self.eps}")
        self.consecutive = int(self.consecutive)

    def measure(self, atom_force_std: np.ndarray, forces: np.ndarray) -> float:
        """The number compared with the threshold: max_i std_i (eV/Å), or max_i std_i / (|F_i| + eps)."""
        std = np.asarray(atom_force_std, dtype=np.float64)
        if self.relative:
            std = std / (np.linalg.norm(np.asarray(forces, dtype=np.float64), axis=-1) + self.eps)
        return float(np.max(std))

    def check(self, atom_force_std: np.ndarray, forces: np.ndarray) -> bool:
        """True when this structure is above the threshold.

        Args:
            atom_force_std: (N,) per-atom force std (eV/Å).
            forces: (N, 3) predicted mean forces (eV/Å).
        """
        return self.measure(atom_force_std, forces) > self.threshold

    def describe(self) -> str:
        quantity = f"max_i atom_force_std_i / (|F_i| + {self.eps:g} eV/Å)" if self.relative else "max atom_force_std"
        unit = "" if self.relative else " eV/Å"
        return f"{quantity} > {self.threshold:g}{unit} for {self.consecutive} consecutive step(s)"


@dataclass
class MDResult:
    """What :func:`run_md` did.

    Attributes:
        steps_done: MD steps integrated (the last record's step).
        stopped: whether the run ended before ``steps`` (stop rule or ``on_uncertain``).
        stop_reason: why it stopped, or None.
        records: one dict per logged step with the keys :data:`RECORD_KEYS` (units: fs, eV, K, eV/Å).
        trajectory_path, log_path, plot_path: the files written (None without ``out_dir``).
    """

    steps_done: int
    stopped: bool
    stop_reason: Optional[str]
    records: List[Dict] = field(default_factory=list)
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


def _record(step: int, atoms: ase.Atoms, timestep_fs: float) -> Dict:
    results = atoms.calc.results
    std = results["atom_force_std"]
    return {
        "step": step,
        "time_fs": step * timestep_fs,
        "energy": float(results["energy"]),
        "kinetic_energy": float(atoms.get_kinetic_energy()),
        "temperature_K": float(atoms.get_temperature()),
        "energy_std": float(results["energy_std"]),
        "max_atom_force_std": float(np.max(std)),
        "mean_atom_force_std": float(np.mean(std)),
    }


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
        stop_rule: a :class:`ForceStdRule`, or any object with ``check(atom_force_std, forces) -> bool`` (and
            optionally ``consecutive``), tested at every step.
        on_uncertain: ``f(step, atoms, record) -> bool`` called whenever the rule fires; True stops the run.
        log_every: record, log and write a trajectory frame every this many steps (and at the last step and
            every step where the rule fires).
        friction: Langevin friction (1/fs).
        seed: seed of the initial velocities and the Langevin noise.
        progress: log progress about 20 times over the run.
        pressure_GPa: external pressure of ``npt`` (GPa).

    Returns:
        An :class:`MDResult`.
    """
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps}")
    if not timestep_fs > 0 or int(log_every) < 1:
        raise ValueError(f"need timestep_fs > 0 and log_every >= 1, got {timestep_fs} and {log_every}")
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
    streak, start, report_every = 0, time.perf_counter(), max(1, steps // 20)
    with ExitStack() as files:
        if out_dir is not None:
            trajectory = files.enter_context(open(result.trajectory_path, "w"))
            table = csv.DictWriter(files.enter_context(open(result.log_path, "w", newline="")), RECORD_KEYS)
            table.writeheader()
        for _ in dyn.irun(steps):
            step = dyn.nsteps
            record = _record(step, atoms, timestep_fs)
            fires = False
            if stop_rule is not None:
                results = atoms.calc.results
                streak = streak + 1 if stop_rule.check(results["atom_force_std"], results["forces"]) else 0
                fires = streak >= needed
            if step % int(log_every) == 0 or step == steps or fires:
                result.records.append(record)
                if out_dir is not None:
                    table.writerow(record)
                    uq_to_atoms(atoms)
                    atoms.info.update(step=step, time_fs=record["time_fs"])
                    ase.io.write(trajectory, atoms, format="extxyz")
                    trajectory.flush()
            if progress and (step % report_every == 0 or step == steps):
                rate = step / max(time.perf_counter() - start, 1e-9)
                log.info("md step %d/%d (%.0f%%), %.2f steps/s, T %.0f K, energy std %.4g eV, max atom force std "
                         "%.4g eV/Å", step, steps, 100 * step / max(steps, 1), rate, record["temperature_K"],
                         record["energy_std"], record["max_atom_force_std"])
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
    """PNG of the uncertainty trace against time: max and mean per-atom force std (eV/Å, with the stop
    threshold when given), energy std (meV/atom with ``n_atoms``, else meV) and temperature (K)."""
    t = np.array([r["time_fs"] for r in records]) / 1000.0
    fig = _new_figure(7.0, 6.5)
    ax_f, ax_e, ax_t = fig.subplots(3, 1, sharex=True)
    ax_f.plot(t, [r["max_atom_force_std"] for r in records], label="max over atoms", color="C3")
    ax_f.plot(t, [r["mean_atom_force_std"] for r in records], label="mean over atoms", color="C0")
    if threshold is not None:
        ax_f.axhline(threshold, color="k", linestyle="--", linewidth=1, label=f"stop threshold {threshold:g}")
    ax_f.set_ylabel("atom force std (eV/Å)")
    ax_f.legend(loc="best", fontsize=8)
    scale = 1000.0 / (n_atoms or 1)
    ax_e.plot(t, [scale * r["energy_std"] for r in records], color="C2")
    ax_e.set_ylabel("energy std (meV/atom)" if n_atoms else "energy std (meV)")
    ax_t.plot(t, [r["temperature_K"] for r in records], color="C1")
    ax_t.set_ylabel("temperature (K)")
    ax_t.set_xlabel("time (ps)")
    ax_f.set_title("uncertainty along the MD trajectory")
    return _save(fig, path)
