"""Structure fingerprints: is a test structure a near-copy of one a model was trained on?

A structure's fingerprint is its sorted list of interatomic distances (Å; minimum-image in periodic
directions), which does not change under translation, rotation or a permutation of atoms. Two structures of the
same composition are compared by the root-mean-square difference of their fingerprints (Å): 0 for the same
structure (whatever the atom order or orientation), about the displacement scale for a rattled copy (a copy whose
atoms are moved by 0.01 Å differs by ~0.01 Å), large for different geometries. Structures of different
compositions are never near-copies (distance ``inf``).

Used to check that a test set shares no frame with a training set, pool or exploration trajectory
(``scripts/study_onthefly.py``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import ase
import numpy as np

#: fingerprint distance (Å) below which two structures count as the same frame
NEAR_COPY_A = 0.01


def fingerprint(atoms: ase.Atoms) -> Tuple[Tuple[int, ...], np.ndarray]:
    """(sorted atomic numbers, sorted interatomic distances in Å) of ``atoms``."""
    distances = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    upper = distances[np.triu_indices(len(atoms), k=1)]
    return tuple(sorted(int(z) for z in atoms.numbers)), np.sort(upper)


def nearest_distances(queries: Sequence[ase.Atoms], references: Sequence[ase.Atoms]) -> np.ndarray:
    """For every query structure, the fingerprint distance (Å) to its nearest reference structure of the same
    composition (``inf`` where no reference has it).

    Args:
        queries: e.g. a test set.
        references: e.g. the training structures, a pool or the frames of a trajectory.

    Returns:
        (len(queries),) array of RMS fingerprint differences, Å.
    """
    by_composition: Dict[Tuple[int, ...], List[np.ndarray]] = defaultdict(list)
    for atoms in references:
        key, prints = fingerprint(atoms)
        by_composition[key].append(prints)
    stacked = {key: np.stack(prints) for key, prints in by_composition.items()}
    out = np.full(len(queries), np.inf)
    for i, atoms in enumerate(queries):
        key, prints = fingerprint(atoms)
        if key in stacked:
            out[i] = float(np.sqrt(((stacked[key] - prints) ** 2).mean(axis=1)).min())
    return out


def near_copies(queries: Sequence[ase.Atoms], references: Sequence[ase.Atoms], tolerance_A: float = NEAR_COPY_A
                ) -> List[int]:
    """Indices of the query structures within ``tolerance_A`` Å (fingerprint distance) of some reference."""
    return [int(i) for i in np.flatnonzero(nearest_distances(queries, references) < tolerance_A)]
