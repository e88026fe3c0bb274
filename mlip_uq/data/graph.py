"""``ase.Atoms`` -> nequip ``AtomicDataDict`` graphs (atom types, neighbour list, labels) and batching."""

from functools import lru_cache
from typing import Sequence

import ase
import torch
from ase.calculators.calculator import all_properties
from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper

from .frames import LABELS, validate_frames


@lru_cache(maxsize=16)
def _type_mapper(type_names: tuple[str, ...]) -> ChemicalSpeciesToAtomTypeMapper:
    return ChemicalSpeciesToAtomTypeMapper(model_type_names=list(type_names))


def _structure_graph(atoms: ase.Atoms, type_names: Sequence[str], with_labels: bool) -> AtomicDataDict.Type:
    """Positions, cell, pbc, atomic numbers, atom types and labels (no edges), in the default dtype."""
    validate_frames([atoms], type_names=type_names, require=(), min_distance=0.0)
    ignored = [p for p in all_properties if not (with_labels and p in LABELS)]
    return _type_mapper(tuple(type_names))(from_ase(atoms, exclude_keys=ignored))


def _cast(data: AtomicDataDict.Type, dtype: torch.dtype | None) -> AtomicDataDict.Type:
    dtype = dtype or torch.get_default_dtype()
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}


def atoms_to_graph(
    atoms: ase.Atoms,
    type_names: Sequence[str],
    r_max: float,
    dtype: torch.dtype | None = None,
    with_labels: bool = True,
) -> AtomicDataDict.Type:
    """One frame as an unbatched nequip ``AtomicDataDict`` ready for a model or ``batched_from_list``.

    Built with nequip's ``from_ase``; atom types are the index of each element in ``type_names``; the full
    neighbour list (both directions, periodic images) comes from nequip's ``compute_neighborlist_`` with the
    vesin backend, or matscipy for mixed pbc (which vesin's nequip backend rejects). The neighbour list is
    computed in the default dtype before casting, so edges do not depend on ``dtype``.

    Args:
        atoms: the frame; labels are read from ``atoms.calc.results`` (as :func:`read_frames` leaves them).
        type_names: element symbols of the model's atom types, in type order.
        r_max: neighbour cutoff (Å).
        dtype: float dtype of positions, cell, cell shifts and labels; default ``torch.get_default_dtype()``.
        with_labels: include the labels ``total_energy`` (1, 1) eV, ``forces`` (N, 3) eV/Å and ``stress``
            (1, 3, 3) eV/Å³ where present.

    Returns:
        Dict with ``pos``, ``cell`` (1, 3, 3), ``pbc`` (1, 3), ``atomic_numbers``, ``atom_types``,
        ``edge_index`` (2, E), ``edge_cell_shift`` (E, 3) and the labels.

    Raises:
        DataError: an element not in ``type_names`` (names it), non-finite positions or cell, or a singular
            periodic cell.
    """
    data = _structure_graph(atoms, type_names, with_labels)
    backend = "vesin" if atoms.pbc.all() or not atoms.pbc.any() else "matscipy"
    return _cast(compute_neighborlist_(data, float(r_max), backend=backend), dtype)


def collate(graphs: list[AtomicDataDict.Type]) -> AtomicDataDict.Type:
    """Batch graphs into one (``AtomicDataDict.batched_from_list``); use as a DataLoader ``collate_fn``.

    All graphs must have the same keys (e.g. all with stress, or none).
    """
    return AtomicDataDict.batched_from_list(graphs)
