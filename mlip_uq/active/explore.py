"""Explorers: where candidate structures come from.

- :class:`Walker` — one MD trajectory from a starting structure, run with the current posterior through
  :func:`mlip_uq.md.run_md` in chunks; its state (positions, momenta, steps done) is saved with the loop state.
- :func:`pool_uncertainty` — the posterior's predicted forces and per-atom force std on a pool of candidate
  structures, in batches (the pool explorer ranks candidates by it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import ase
import numpy as np
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from nequip.data import AtomicDataDict

from ..data import collate
from ..posterior import Posterior
from ..posterior.predict import predict_samples, predictive_moments
from .state import atoms_from_dict, atoms_to_dict, bare_atoms


@dataclass
class Walker:
    """An MD walker: where it is, how far it has gone.

    Attributes:
        index: walker number (also its seed offset).
        start: the starting structure (JSON form, without momenta).
        atoms: the current structure with momenta (JSON form).
        steps_done: MD steps run so far.
        chunks: MD chunks run so far (each chunk has its own thermostat seed).
        restarts: times the walker was sent back to its start (after a failed reference call).
        last_call: the walker step of its last reference call (-1: none yet).
        done: True when its steps are used up or its composition was rejected.
    """

    index: int
    start: Dict
    atoms: Dict
    steps_done: int = 0
    chunks: int = 0
    restarts: int = 0
    last_call: int = -1
    done: bool = False

    @classmethod
    def new(cls, index: int, atoms: ase.Atoms, temperature_K: float, seed: int) -> "Walker":
        walker = cls(index=index, start=atoms_to_dict(bare_atoms(atoms)), atoms={})
        walker.reset(temperature_K, seed)
        return walker

    def reset(self, temperature_K: float, seed: int) -> None:
        """Back to the start with fresh Maxwell–Boltzmann velocities at ``temperature_K`` (zero total momentum),
        drawn from a generator seeded by (``seed``, walker, restart)."""
        atoms = atoms_from_dict(self.start)
        rng = np.random.default_rng([seed, self.index, self.restarts])
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
        Stationary(atoms)
        self.atoms = atoms_to_dict(atoms, momenta=True)

    def current(self) -> ase.Atoms:
        return atoms_from_dict(self.atoms)

    def chunk_seed(self, seed: int) -> int:
        """Thermostat seed of the next chunk: a pure function of (seed, walker, chunk), so that a resumed
        walker repeats exactly the chunk it was killed in."""
        return int(np.random.default_rng([seed, self.index, self.chunks, 1]).integers(2**31))


def pool_uncertainty(posterior: Posterior, graphs: Sequence[AtomicDataDict.Type], batch_size: int = 16
                     ) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Predicted forces and per-atom force std of every graph, batched, with the calculator's definitions
    (:func:`~mlip_uq.posterior.predict.predictive_moments`, recalibrated by the posterior's calibration).

    Args:
        posterior: the posterior.
        graphs: unbatched graphs with neighbour lists (no labels needed).
        batch_size: graphs per batch.

    Returns:
        Two lists with one entry per graph: mean forces (N, 3) eV/Å and ``atom_force_std`` (N,) eV/Å.
    """
    forces, stds = [], []
    for start in range(0, len(graphs), batch_size):
        batch = AtomicDataDict.to_(collate(list(graphs[start : start + batch_size])), posterior.device)
        moments = predictive_moments(predict_samples(posterior, batch)).calibrated(posterior.calibration)
        atom_std = moments.atom_force_std
        for f in range(len(moments.n_atoms)):
            atoms = moments.frame == f
            forces.append(moments.forces[atoms])
            stds.append(atom_std[atoms])
    return forces, stds


def next_walker(walkers: Sequence[Walker], after: int) -> Optional[Walker]:
    """The first walker not done after walker ``after`` (round robin), or None."""
    n = len(walkers)
    for shift in range(1, n + 1):
        walker = walkers[(after + shift) % n]
        if not walker.done:
            return walker
    return None
