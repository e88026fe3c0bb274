"""HDF5 store of prepared frames and their neighbour lists, so a data set is prepared once.

Layout (one file, h5py; ragged per-atom and per-edge arrays concatenated over frames, sliced by offsets)::

    /atoms/numbers          (A,)      int64   atomic numbers
    /atoms/positions        (A, 3)    float64 Å
    /atoms/forces           (A, 3)    float64 eV/Å (NaN where the frame has none)
    /frames/energy          (F,)      float64 eV (NaN where the frame has none)
    /frames/has_energy, has_forces, has_stress   (F,) bool
    /frames/cell            (F, 3, 3) float64 Å
    /frames/pbc             (F, 3)    bool
    /frames/stress          (F, 3, 3) float64 eV/Å³ (zero where the frame has none)
    /frames/atom_offsets    (F + 1,)  int64   atoms of frame f are rows atom_offsets[f]:atom_offsets[f + 1]
    /frames/edge_offsets    (F + 1,)  int64   same for edges
    /edges/edge_index       (2, E)    int32   (source, target) atom indices local to the frame
    /edges/edge_cell_shift  (E, 3)    int32   cell shift of the target image

Root attributes: ``format`` ("mlip_uq.FrameStore"), ``format_version``, ``type_names`` (JSON list), ``r_max`` (Å),
``references`` (JSON {element: eV} or null), ``source`` (str), ``fingerprint`` (:func:`frames_fingerprint`).
"""

import json
from pathlib import Path
from typing import Sequence

import ase
import h5py
import numpy as np
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress
from nequip.data import AtomicDataDict

from ..files import atomic_write
from .frames import DataError, frames_fingerprint, validate_frames
from .graph import _cast, _structure_graph, atoms_to_graph

FORMAT = "mlip_uq.FrameStore"
FORMAT_VERSION = 1
_LAYOUT = {
    "atoms": ("numbers", "positions", "forces"),
    "frames": (
        "energy", "has_energy", "has_forces", "has_stress", "cell", "pbc", "stress", "atom_offsets", "edge_offsets"
    ),
    "edges": ("edge_index", "edge_cell_shift"),
}


class FrameStore:
    """A prepared data set on disk; make one with :meth:`create` or :meth:`for_frames`, read one with :meth:`open`.

    Attributes:
        path: the HDF5 file.
        type_names: element symbols in atom-type order.
        r_max: neighbour cutoff (Å) of the stored edges.
        references: {element: eV} energy references, or None.
        source: where the frames came from (free text), or None.
        fingerprint: :func:`frames_fingerprint` of the stored frames.
    """

    def __init__(self, path: str | Path):
        """Open ``path`` (same as :meth:`open`)."""
        self.path = Path(path)
        self._load()

    @classmethod
    def open(cls, path: str | Path) -> "FrameStore":
        """Open an existing store.

        Raises:
            DataError: the file is missing, is not HDF5 (e.g. truncated or text), is HDF5 but not a FrameStore,
                is of another format version, or lacks a dataset.
        """
        return cls(path)

    def _load(self) -> None:
        if not self.path.is_file():
            raise DataError(f"{self.path}: FrameStore file not found")
        try:
            file = h5py.File(self.path, "r")
        except OSError as error:
            raise DataError(f"{self.path}: not a readable HDF5 file (truncated or another format): {error}") from None
        with file:
            attrs = file.attrs
            if attrs.get("format") != FORMAT:
                raise DataError(
                    f"{self.path}: not a FrameStore (format attribute {attrs.get('format')!r}, expected {FORMAT!r})"
                )
            if attrs.get("format_version") != FORMAT_VERSION:
                raise DataError(
                    f"{self.path}: FrameStore format version {attrs.get('format_version')}, this code reads "
                    f"{FORMAT_VERSION}; rebuild the store"
                )
            missing = [f"{g}/{n}" for g, names in _LAYOUT.items() for n in names if f"{g}/{n}" not in file]
            if missing:
                raise DataError(f"{self.path}: FrameStore lacks dataset(s) {missing}")
            self.type_names = json.loads(attrs["type_names"])
            self.r_max = float(attrs["r_max"])
            self.references = json.loads(attrs["references"])
            self.source = attrs["source"] or None
            self.fingerprint = str(attrs["fingerprint"])
            self._n_frames = len(file["frames/energy"])

    def __len__(self) -> int:
        return self._n_frames

    @classmethod
    def create(
        cls,
        path: str | Path,
        frames: Sequence[ase.Atoms],
        type_names: Sequence[str],
        r_max: float,
        references: dict[str, float] | None = None,
        source: str | None = None,
    ) -> "FrameStore":
        """Compute the neighbour lists of ``frames`` once and write them, atomically, to ``path``.

        Neighbour lists are computed as :func:`atoms_to_graph` computes them, in the default dtype (float64 under
        nequip's ``set_global_state``); :meth:`graphs` casts afterwards.

        Args:
            path: the HDF5 file; replaced if it exists.
            frames: labelled frames (labels in ``atoms.calc.results``, as :func:`read_frames` leaves them).
            type_names: element symbols in atom-type order.
            r_max: neighbour cutoff (Å).
            references: {element: eV} energy references to keep with the data, or None.
            source: free text naming where the frames came from.

        Raises:
            DataError: invalid frames (see :func:`validate_frames`).
        """
        validate_frames(frames, type_names=type_names, require=(), min_distance=0.0)
        attrs = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "type_names": json.dumps(list(type_names)),
            "r_max": float(r_max),
            "references": json.dumps(references),
            "source": "" if source is None else str(source),
            "fingerprint": frames_fingerprint(frames),
        }
        _write(Path(path), _arrays(frames, type_names, r_max), attrs)
        return cls(path)

    @classmethod
    def for_frames(
        cls,
        store_path: str | Path,
        frames: Sequence[ase.Atoms],
        type_names: Sequence[str],
        r_max: float,
        references: dict[str, float] | None = None,
        source: str | None = None,
    ) -> "FrameStore":
        """The store of ``frames`` at ``store_path``: reused when it matches, (re)built otherwise.

        An existing store is reused when its fingerprint (of the frames and their labels), ``r_max``,
        ``type_names`` and ``references`` all match; otherwise it is rebuilt with :meth:`create`.

        Args:
            store_path: the store's HDF5 file.
            frames: labelled frames, as :func:`read_frames` returns them.
            type_names, r_max, references, source: as in :meth:`create`.

        Raises:
            DataError: ``store_path`` exists but is not a readable FrameStore (it is not overwritten; delete it
                or choose another path).
        """
        if Path(store_path).exists():
            store = cls.open(store_path)
            if (store.fingerprint, store.r_max, store.type_names, store.references) == (
                frames_fingerprint(frames), float(r_max), list(type_names), references
            ):
                return store
        return cls.create(store_path, frames, type_names, r_max, references=references, source=source)

    def append(self, frames: Sequence[ase.Atoms]) -> None:
        """Add frames at the end; the whole store is rewritten to a temporary file that replaces the old one, so
        an interruption leaves the old store intact.

        Raises:
            DataError: invalid frames, or an element not in ``type_names``.
        """
        validate_frames(frames, type_names=self.type_names, require=(), min_distance=0.0)
        with h5py.File(self.path, "r") as file:
            old = _read_all(file)
            attrs = dict(file.attrs)
        new = _arrays(frames, self.type_names, self.r_max)
        attrs["fingerprint"] = frames_fingerprint(self.atoms() + list(frames))
        _write(self.path, _concat([old, new]), attrs)
        self._load()

    def graphs(
        self, indices: Sequence[int] | None = None, dtype: torch.dtype | None = None
    ) -> list[AtomicDataDict.Type]:
        """Frames as unbatched graphs, equal tensor for tensor to :func:`atoms_to_graph` of the same frames.

        Args:
            indices: frame indices; default all, in order.
            dtype: float dtype; default ``torch.get_default_dtype()``.
        """
        graphs = []
        for atoms, edge_index, shift in self._read(indices, edges=True):
            data = _structure_graph(atoms, self.type_names, with_labels=True)
            data[AtomicDataDict.EDGE_INDEX_KEY] = torch.as_tensor(edge_index, dtype=torch.long)
            shift_dtype = data[AtomicDataDict.POSITIONS_KEY].dtype
            data[AtomicDataDict.EDGE_CELL_SHIFT_KEY] = torch.as_tensor(shift, dtype=shift_dtype)
            graphs.append(_cast(data, dtype))
        return graphs

    def atoms(self, indices: Sequence[int] | None = None) -> list[ase.Atoms]:
        """Frames as ``ase.Atoms`` with a ``SinglePointCalculator`` holding the stored labels (stress as Voigt).

        Args:
            indices: frame indices; default all, in order.
        """
        return [atoms for atoms, _, _ in self._read(indices, edges=False)]

    def energy_per_atom(self) -> np.ndarray:
        """(F,) energy per atom (eV/atom): (E − Σ_i e_{Z_i}) / N with the store's references, E / N without; NaN
        for frames without energy."""
        with h5py.File(self.path, "r") as file:
            energy, offsets = file["frames/energy"][()], file["frames/atom_offsets"][()]
            numbers = file["atoms/numbers"][()]
        n_atoms = np.diff(offsets)
        if self.references:
            present = np.unique(numbers)
            missing = [chemical_symbols[z] for z in present if chemical_symbols[z] not in self.references]
            if missing:
                raise DataError(f"{self.path}: no energy reference for element(s) {missing}")
            table = np.zeros(present.max() + 1)
            table[present] = [self.references[chemical_symbols[z]] for z in present]
            frame_of_atom = np.repeat(np.arange(len(n_atoms)), n_atoms)
            energy = energy - np.bincount(frame_of_atom, table[numbers], minlength=len(n_atoms))
        return energy / n_atoms

    def _read(self, indices, edges: bool) -> list[tuple[ase.Atoms, np.ndarray | None, np.ndarray | None]]:
        """(atoms, local edge_index (2, E), cell shifts (E, 3)) per frame, edges None when not asked. One read of
        the contiguous block of rows spanning the requested frames."""
        indices = np.arange(len(self))[slice(None) if indices is None else np.asarray(indices, dtype=np.int64)]
        if indices.size == 0:
            return []
        with h5py.File(self.path, "r") as file:
            frame = {name: file[f"frames/{name}"][()] for name in _LAYOUT["frames"]}
            a, e = frame["atom_offsets"], frame["edge_offsets"]
            lo, hi = indices.min(), indices.max() + 1
            atom = {name: file[f"atoms/{name}"][a[lo] : a[hi]] for name in _LAYOUT["atoms"]}
            if edges:
                edge_index = file["edges/edge_index"][:, e[lo] : e[hi]]
                shifts = file["edges/edge_cell_shift"][e[lo] : e[hi]]
        out = []
        for f in indices:
            rows = slice(a[f] - a[lo], a[f + 1] - a[lo])
            atoms = ase.Atoms(numbers=atom["numbers"][rows], positions=atom["positions"][rows],
                              cell=frame["cell"][f], pbc=frame["pbc"][f])
            labels = {}
            if frame["has_energy"][f]:
                labels["energy"] = float(frame["energy"][f])
            if frame["has_forces"][f]:
                labels["forces"] = atom["forces"][rows]
            if frame["has_stress"][f]:
                labels["stress"] = full_3x3_to_voigt_6_stress(frame["stress"][f])
            atoms.calc = SinglePointCalculator(atoms, **labels)
            pairs = slice(e[f] - e[lo], e[f + 1] - e[lo])
            out.append((atoms, edge_index[:, pairs], shifts[pairs]) if edges else (atoms, None, None))
        return out


_DTYPES = {"numbers": np.int64, "n_atoms": np.int64, "n_edges": np.int64, "edge_index": np.int32,
           "edge_cell_shift": np.int32, "has_energy": bool, "has_forces": bool, "has_stress": bool, "pbc": bool}


def _arrays(frames: Sequence[ase.Atoms], type_names: Sequence[str], r_max: float) -> dict[str, np.ndarray]:
    """In-memory layout of ``frames``: as on disk, with ``atom_offsets``/``edge_offsets`` replaced by per-frame
    counts ``n_atoms``/``n_edges``."""
    parts = []
    for atoms in frames:
        graph = atoms_to_graph(atoms, type_names, r_max, with_labels=False)
        edge_index = graph[AtomicDataDict.EDGE_INDEX_KEY]
        results = atoms.calc.results if atoms.calc is not None else {}
        stress = np.asarray(results.get("stress", np.zeros((3, 3))), dtype=np.float64)
        parts.append({
            "numbers": atoms.numbers,
            "positions": atoms.positions,
            "forces": results.get("forces", np.full((len(atoms), 3), np.nan)),
            "energy": [results.get("energy", np.nan)],
            "has_energy": ["energy" in results],
            "has_forces": ["forces" in results],
            "has_stress": ["stress" in results],
            "cell": [atoms.cell.array],
            "pbc": [atoms.pbc],
            "stress": [voigt_6_to_full_3x3_stress(stress) if stress.shape == (6,) else stress],
            "edge_index": edge_index.numpy(),
            "edge_cell_shift": graph[AtomicDataDict.EDGE_CELL_SHIFT_KEY].round().numpy(),
            "n_atoms": [len(atoms)],
            "n_edges": [edge_index.shape[1]],
        })
    return _concat(parts)


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    """Concatenate in-memory layouts (edge_index along its edge axis 1, everything else along axis 0)."""
    return {
        name: np.concatenate([np.asarray(p[name]) for p in parts], axis=1 if name == "edge_index" else 0)
        .astype(_DTYPES.get(name, np.float64))
        for name in parts[0]
    }


def _read_all(file: h5py.File) -> dict[str, np.ndarray]:
    """The whole store in the in-memory layout of :func:`_arrays`."""
    arrays = {name: file[f"{group}/{name}"][()] for group, names in _LAYOUT.items() for name in names}
    arrays["n_atoms"] = np.diff(arrays.pop("atom_offsets"))
    arrays["n_edges"] = np.diff(arrays.pop("edge_offsets"))
    return arrays


def _fill(file: h5py.File, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write the in-memory layout and root attributes into an open, empty HDF5 file."""
    data = dict(arrays)
    data["atom_offsets"] = np.concatenate([[0], np.cumsum(data.pop("n_atoms"))]).astype(np.int64)
    data["edge_offsets"] = np.concatenate([[0], np.cumsum(data.pop("n_edges"))]).astype(np.int64)
    for group, names in _LAYOUT.items():
        for name in names:
            file.create_dataset(f"{group}/{name}", data=data[name])
    file.attrs.update(attrs)


def _write(path: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write the store to ``path`` atomically (:func:`mlip_uq.files.atomic_write`)."""
    with atomic_write(path) as temporary:
        with h5py.File(temporary, "w") as file:
            _fill(file, arrays, attrs)
