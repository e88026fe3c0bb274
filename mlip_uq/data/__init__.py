"""Data layer: labelled frames (ASE) -> validated, referenced, split, stored nequip graphs.

Units are ASE's: energies eV, forces eV/Å, stress eV/Å³ (Voigt), distances Å.
"""

from .frames import DataError, LabelKeys, frames_fingerprint, neighbor_pairs, read_frames, validate_frames
from .graph import atoms_to_graph, collate
from .references import composition_counts, filter_frames, fit_energy_references, referenced_energy_per_atom
from .splits import cell_size_split, cluster_split, property_range_split, random_split
from .store import FrameStore

__all__ = [
    "DataError",
    "FrameStore",
    "LabelKeys",
    "atoms_to_graph",
    "cell_size_split",
    "cluster_split",
    "collate",
    "composition_counts",
    "filter_frames",
    "fit_energy_references",
    "frames_fingerprint",
    "neighbor_pairs",
    "property_range_split",
    "random_split",
    "read_frames",
    "referenced_energy_per_atom",
    "validate_frames",
]
