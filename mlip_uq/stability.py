"""Does a model keep MD physical? Divergence checks and many independent MD runs at once.

A molecular structure is *unphysical* (:func:`unphysical`) when two atoms are closer than ``min_distance_A``
(0.6 Å: no bond is that short) or its bond graph (bonded: within 1.3x the sum of the covalent radii) has more
connected fragments than the starting structure's: the molecule broke apart or collapsed, which at 600–1,200 K
an organic molecule of this size does not do on picosecond time scales, so a model that produces it is wrong.

:func:`stability_runs` runs ``n_runs`` independent Langevin trajectories of one molecule as *replicas*: copies
placed ``spacing_A`` apart (far beyond any cutoff) in one non-periodic system, so that one batched model call
moves them all. Langevin's friction and noise act on every atom separately, so the replicas are independent
trajectories (each from its own Maxwell–Boltzmann velocities). Every ``check_every`` steps each replica is
checked; an unphysical one is recorded with the step and taken out of the system, so that it cannot disturb
the others (a chunk whose dynamics collapse two atoms, ``MDResult.collapsed``, ends where it is: the replicas
are checked there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import ase
import numpy as np
from ase.data import covalent_radii
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from scipy.sparse.csgraph import connected_components

from .md import run_md

log = logging.getLogger(__name__)


def bond_fragments(atoms: ase.Atoms, distances: Optional[np.ndarray] = None) -> int:
    """Connected fragments of the bond graph (bonded: closer than 1.3x the sum of the covalent radii);
    ``distances``: the (N, N) interatomic distances (Å) when already computed."""
    radii = covalent_radii[atoms.numbers]
    d = atoms.get_all_distances() if distances is None else distances
    return int(connected_components(d < 1.3 * (radii[:, None] + radii[None, :]), directed=False)[0])


def unphysical(atoms: ase.Atoms, n_fragments: int, min_distance_A: float = 0.6) -> bool:
    """Two atoms closer than ``min_distance_A`` Å, or more bond fragments than ``n_fragments`` (the start's), or
    a non-finite position."""
    if not np.isfinite(atoms.positions).all():
        return True
    d = atoms.get_all_distances()
    if d[~np.eye(len(atoms), dtype=bool)].min() < min_distance_A:
        return True
    return bond_fragments(atoms, d) > n_fragments


@dataclass
class StabilityResult:
    """Outcome of :func:`stability_runs`.

    Attributes:
        temperature_K: the thermostat's temperature (K).
        steps: MD steps each run was to make; ``timestep_fs``: its time step (fs).
        n_runs: the runs.
        failed_at: run index -> the MD step of the check that found it unphysical (the end of its chunk).
        errors: why a chunk's dynamics ended early (two atoms collapsed onto each other,
            ``MDResult.stop_reason``; the runs it concerned are in ``failed_at``).
    """

    temperature_K: float
    steps: int
    timestep_fs: float
    n_runs: int
    failed_at: Dict[int, int] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)

    @property
    def physical(self) -> int:
        """Runs that stayed physical for all their steps."""
        return self.n_runs - len(self.failed_at)

    def to_dict(self) -> Dict:
        return {"temperature_K": self.temperature_K, "steps": self.steps, "timestep_fs": self.timestep_fs,
                "time_ps": self.steps * self.timestep_fs / 1000, "n_runs": self.n_runs, "physical": self.physical,
                "failed_at_step": {str(k): v for k, v in sorted(self.failed_at.items())}, "errors": self.errors}


def stability_runs(calculator, start: ase.Atoms, temperature_K: float, n_runs: int = 10, steps: int = 20000,
                   timestep_fs: float = 0.5, check_every: int = 100, friction: float = 0.01, seed: int = 0,
                   spacing_A: float = 100.0, min_distance_A: float = 0.6,
                   progress: Optional[bool] = None) -> StabilityResult:
    """``n_runs`` independent Langevin MD runs of the molecule ``start`` with ``calculator`` (module docstring).

    Args:
        calculator: an ASE calculator for the replicas' system (e.g. :class:`~mlip_uq.UQCalculator`).
        start: the starting molecule (non-periodic); each run draws its own velocities at ``temperature_K``.
        temperature_K: thermostat temperature (K).
        n_runs: independent runs.
        steps: MD steps per run (``steps * timestep_fs`` fs).
        timestep_fs: time step (fs).
        check_every: steps between two divergence checks (and MD chunks).
        friction: Langevin friction (1/fs).
        seed: seed of the velocities and of every chunk's Langevin noise.
        spacing_A: distance between neighbouring replicas (Å).
        min_distance_A: the shortest allowed interatomic distance (Å).
        progress: log progress (default: when more than 10,000 steps).

    Returns:
        A :class:`StabilityResult`.
    """
    if start.pbc.any():
        raise ValueError("stability_runs takes a molecule (pbc all False); got a periodic structure")
    n_atoms, n_fragments = len(start), bond_fragments(start)
    if unphysical(start, n_fragments, min_distance_A):
        raise ValueError("the starting structure is already unphysical (atoms closer than "
                         f"{min_distance_A} Å)")
    replicas = {}
    for run in range(n_runs):
        atoms = start.copy()
        atoms.calc = None
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=np.random.default_rng([seed, run]))
        Stationary(atoms)
        atoms.positions += [run * spacing_A, 0.0, 0.0]
        replicas[run] = atoms
    result = StabilityResult(float(temperature_K), int(steps), float(timestep_fs), int(n_runs))
    done, chunk = 0, 0
    report = progress if progress is not None else steps > 10000
    while done < steps and replicas:
        alive = sorted(replicas)
        system = sum((replicas[r] for r in alive[1:]), replicas[alive[0]].copy())
        length = min(check_every, steps - done)
        md = run_md(system, calculator, length, timestep_fs=timestep_fs, temperature_K=temperature_K,
                    ensemble="langevin", friction=friction, seed=int(np.random.default_rng([seed, chunk, 7])
                                                                     .integers(2**31)),
                    progress=False, uq_every=length, log_every=length)
        if md.collapsed:
            result.errors.append(md.stop_reason)
        broken = []
        for k, run in enumerate(alive):
            atoms = system[k * n_atoms:(k + 1) * n_atoms]
            atoms.calc = None
            replicas[run] = atoms
            if unphysical(atoms, n_fragments, min_distance_A):
                broken.append(run)
        if md.collapsed and not broken:  # collapsed, and no replica looks broken: none can go on
            broken = alive
        for run in broken:
            result.failed_at[run] = done + length
            del replicas[run]
        done += length
        chunk += 1
        if report and chunk % max(1, steps // check_every // 10) == 0:
            log.info("stability %.0f K: step %d/%d, %d of %d runs physical", temperature_K, done, steps,
                     n_runs - len(result.failed_at), n_runs)
    return result
