"""Reading, validating and fingerprinting labelled frames (``ase.Atoms`` with a ``SinglePointCalculator``).

After :func:`read_frames` every frame carries its labels in ``atoms.calc.results`` under ASE's names and units:
``energy`` (eV), ``forces`` (N, 3) eV/Å, ``stress`` (6,) Voigt eV/Å³. The rest of the data layer reads labels
from there only.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import ase
import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.geometry import complete_cell
from ase.stress import full_3x3_to_voigt_6_stress
from vesin import NeighborList

LABELS = ("energy", "forces", "stress")


class DataError(ValueError):
    """Bad input to the data layer: unreadable file, missing label, non-finite value, unknown element, ..."""


@dataclass(frozen=True)
class LabelKeys:
    """Names under which a file stores the labels.

    Each is looked up first in ``atoms.calc.results`` (what ASE's readers fill), then in ``atoms.info``
    (energy, stress) or ``atoms.arrays`` (forces).

    Attributes:
        energy: key of the total energy (eV).
        forces: key of the forces, (N, 3) eV/Å.
        stress: key of the stress, eV/Å³, as 6 Voigt, 9 or 3x3 values.
    """

    energy: str = "energy"
    forces: str = "forces"
    stress: str = "stress"


def read_frames(
    path: str | Path,
    index: str | int | slice = ":",
    keys: LabelKeys | None = None,
    require: Sequence[str] = ("energy", "forces"),
    type_names: Sequence[str] | None = None,
    min_distance: float = 0.5,
) -> list[ase.Atoms]:
    """Read labelled frames from any ASE-readable file and validate them.

    Args:
        path: the file (extxyz, xyz, traj, ...; format guessed by ``ase.io.read``).
        index: which frames, as ``ase.io.read`` takes it. Default all.
        keys: where the labels are stored; default :class:`LabelKeys` (``energy``, ``forces``, ``stress``).
        require: labels every frame must have, from ``("energy", "forces", "stress")``.
        type_names: element symbols allowed; ``None`` allows all.
        min_distance: smallest allowed interatomic distance (Å), periodic images included; 0 disables.

    Returns:
        The frames, each with a fresh ``SinglePointCalculator`` holding ``energy`` (eV), ``forces`` (N, 3) eV/Å
        and ``stress`` (6,) Voigt eV/Å³ where the file has them.

    Raises:
        DataError: the file is missing, empty, unreadable or corrupt (message names the file), or a frame fails
            :func:`validate_frames` (message names the file, the frame and the problem).
    """
    path = Path(path)
    keys = keys or LabelKeys()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file, no frames")
    try:
        frames = ase.io.read(path, index)
    except Exception as error:  # ASE raises many types for corrupt files
        raise DataError(f"{path}: cannot read, corrupt or unknown format ({type(error).__name__}: {error})") from error
    frames = [frames] if isinstance(frames, ase.Atoms) else list(frames)
    try:
        for i, atoms in enumerate(frames):
            atoms.calc = SinglePointCalculator(atoms, **_labels(atoms, keys, i))
        validate_frames(frames, type_names=type_names, require=require, min_distance=min_distance)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
    return frames


def _labels(atoms: ase.Atoms, keys: LabelKeys, i: int) -> dict[str, float | np.ndarray]:
    """The labels of frame ``i`` found under ``keys``, as ASE names: energy float, forces array, stress Voigt."""
    results = atoms.calc.results if atoms.calc is not None else {}
    found = {}
    for name, where in (("energy", atoms.info), ("forces", atoms.arrays), ("stress", atoms.info)):
        key = getattr(keys, name)
        value = results.get(key, where.get(key))
        if value is None:
            continue
        try:
            value = np.array(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"frame {i}: {name} (key {key!r}) is not numeric: {value!r}") from None
        if name == "energy":
            if value.size != 1:
                raise DataError(f"frame {i}: energy (key {key!r}) must be one number, got shape {value.shape}")
            value = float(value.reshape(()))
        elif name == "stress":
            value = _voigt(value, i)
        found[name] = value
    return found


def _voigt(stress: np.ndarray, i: int) -> np.ndarray:
    """Stress given as 6 Voigt, 9 or 3x3 values, as Voigt (6,) (xx, yy, zz, yz, xz, xy)."""
    if stress.size == 9:
        return full_3x3_to_voigt_6_stress(stress.reshape(3, 3))
    if stress.size == 6:
        return stress.reshape(6)
    raise DataError(f"frame {i}: stress must have 6 (Voigt), 9 or 3x3 values, got shape {stress.shape}")


def validate_frames(
    frames: Sequence[ase.Atoms],
    type_names: Sequence[str] | None = None,
    require: Sequence[str] = ("energy", "forces"),
    min_distance: float = 0.5,
) -> None:
    """Check frames before they reach a model; labels are read from ``atoms.calc.results``.

    Args:
        frames: the frames.
        type_names: element symbols allowed; ``None`` allows all.
        require: labels every frame must have, from ``("energy", "forces", "stress")``.
        min_distance: smallest allowed distance (Å) between two atoms, using periodic images (minimum image
            and beyond, so an atom closer than this to its own image also fails); 0 disables the check.

    Raises:
        DataError: naming the frame index and the problem: no frames, a frame with zero atoms, NaN/inf in
            positions, cell or a label, a zero or singular cell along periodic axes, an element outside
            ``type_names``, a missing required label, forces not of shape (N, 3), stress not of 6 or 3x3
            values, or two atoms closer than ``min_distance``.
    """
    unknown_labels = set(require) - set(LABELS)
    if unknown_labels:
        raise DataError(f"unknown required label(s) {sorted(unknown_labels)}; choose from {list(LABELS)}")
    if len(frames) == 0:
        raise DataError("no frames")
    for i, atoms in enumerate(frames):
        _validate_frame(atoms, i, type_names, require, min_distance)


def _validate_frame(
    atoms: ase.Atoms, i: int, type_names: Sequence[str] | None, require: Sequence[str], min_distance: float
) -> None:
    n = len(atoms)
    if n == 0:
        raise DataError(f"frame {i}: zero atoms")
    bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))
    if bad.size:
        raise DataError(f"frame {i}: NaN or inf in positions of atom(s) {bad[:10].tolist()}")
    cell, pbc = atoms.cell.array, atoms.pbc
    if not np.isfinite(cell).all():
        raise DataError(f"frame {i}: NaN or inf in cell {cell.tolist()}")
    if pbc.any():
        periodic = cell[pbc]
        volume = np.sqrt(abs(np.linalg.det(periodic @ periodic.T)))  # length, area or volume of periodic axes
        if volume < 1e-6:
            raise DataError(f"frame {i}: zero or singular cell {cell.tolist()} along periodic axes pbc={pbc.tolist()}")
    if type_names is not None:
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(type_names))
        if unknown:
            raise DataError(f"frame {i}: element(s) {unknown} not in type_names {list(type_names)}")
    results = atoms.calc.results if atoms.calc is not None else {}
    for name in require:
        if name not in results:
            raise DataError(f"frame {i}: missing required label {name!r}")
    shapes = {"energy": [(), (1,)], "forces": [(n, 3)], "stress": [(6,), (3, 3)]}
    for name, allowed in shapes.items():
        if name not in results:
            continue
        value = np.asarray(results[name], dtype=np.float64)
        if value.shape not in allowed:
            raise DataError(f"frame {i}: {name} has shape {value.shape}, expected one of {allowed}")
        if not np.isfinite(value).all():
            raise DataError(f"frame {i}: NaN or inf in {name}")
    if min_distance > 0:
        first, second, shift, distance = neighbor_pairs(atoms, min_distance, "ijSd", full_list=False)
        if distance.size:
            k = np.argmin(distance)
            raise DataError(
                f"frame {i}: atoms {first[k]} and {second[k]} (image shift {shift[k].tolist()}) are "
                f"{distance[k]:.4f} Å apart, closer than min_distance={min_distance} Å"
            )


def neighbor_pairs(atoms: ase.Atoms, cutoff: float, quantities: str, full_list: bool = True) -> list[np.ndarray]:
    """Pairs of atoms closer than ``cutoff`` (Å), periodic images included, from vesin (mixed pbc allowed).

    Args:
        atoms: the frame (finite positions, non-singular cell along periodic axes).
        cutoff: pair cutoff (Å).
        quantities: vesin's quantity letters, e.g. ``"ijSd"`` (first, second, cell shift, distance in Å).
        full_list: both (i, j) and (j, i) when True, each pair once when False.

    Returns:
        One array per letter of ``quantities``; indices as int64.
    """
    out = NeighborList(cutoff=float(cutoff), full_list=full_list).compute(
        points=atoms.positions, box=complete_cell(atoms.cell.array), periodic=tuple(atoms.pbc), quantities=quantities
    )
    return [a.astype(np.int64) if q in "ijPS" else a for q, a in zip(quantities, out)]


def frames_fingerprint(frames: Sequence[ase.Atoms]) -> str:
    """SHA-256 over atomic numbers, positions, cell, pbc and labels (energy, forces, Voigt stress) of frames.

    Used to record which training data made a model; equal frames give equal fingerprints independently of
    the dtype they were stored in.

    Args:
        frames: frames with labels in ``atoms.calc.results`` (absent labels are hashed as absent).

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()

    def add(tag: str, value, dtype) -> None:
        value = np.ascontiguousarray(value, dtype=dtype)
        digest.update(f"{tag}{value.shape}".encode())
        digest.update(value.tobytes())

    for i, atoms in enumerate(frames):
        add("numbers", atoms.numbers, np.int64)
        add("positions", atoms.positions, np.float64)
        add("cell", atoms.cell.array, np.float64)
        add("pbc", atoms.pbc, np.bool_)
        results = atoms.calc.results if atoms.calc is not None else {}
        for name in LABELS:
            if name in results:
                value = np.asarray(results[name], dtype=np.float64)
                add(name, _voigt(value, i) if name == "stress" else value, np.float64)
    return digest.hexdigest()
