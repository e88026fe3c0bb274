"""Per-element energy references and outlier filtering.

A reference assigns each element an energy e_Z (eV) so that E ≈ Σ_i e_{Z_i}; the referenced energy per atom
(E − Σ_i e_{Z_i}) / N (eV/atom) is what a model learns and what outlier filters and property splits look at.
"""

from collections import Counter
from typing import Sequence

import ase
import numpy as np

from .frames import DataError


def composition_counts(frames: Sequence[ase.Atoms], type_names: Sequence[str]) -> np.ndarray:
    """Number of atoms of each element in each frame.

    Args:
        frames: the frames.
        type_names: element symbols, one column each.

    Returns:
        (n_frames, n_types) int64 counts.

    Raises:
        DataError: a frame holds an element not in ``type_names`` (names the frame and element).
    """
    column = {name: k for k, name in enumerate(type_names)}
    counts = np.zeros((len(frames), len(type_names)), dtype=np.int64)
    for i, atoms in enumerate(frames):
        for symbol, count in Counter(atoms.get_chemical_symbols()).items():
            if symbol not in column:
                raise DataError(f"frame {i}: element {symbol!r} not in {list(type_names)}")
            counts[i, column[symbol]] = count
    return counts


def _energies(frames: Sequence[ase.Atoms]) -> np.ndarray:
    """Total energies (eV) from ``atoms.calc.results``; DataError naming the first frame without one."""
    energies = np.empty(len(frames))
    for i, atoms in enumerate(frames):
        if atoms.calc is None or "energy" not in atoms.calc.results:
            raise DataError(f"frame {i}: no energy label")
        energies[i] = atoms.calc.results["energy"]
    return energies


def fit_energy_references(
    frames: Sequence[ase.Atoms], type_names: Sequence[str], start: dict[str, float] | None = None
) -> dict[str, float]:
    """Least-squares per-element energies: minimise Σ_frames (E − Σ_Z n_Z e_Z)².

    When the compositions do not determine the fit (fewer independent compositions than elements, e.g. only
    stoichiometric TiO2 cells, or an element absent from every frame), the solution closest to ``start`` is
    returned (minimum-norm ``numpy.linalg.lstsq`` of the deviations from it): it reproduces the fitted energies,
    and the directions the data leave open keep ``start``'s values (e.g. isolated-atom energies, so that a model
    trained on TiO2 alone still extrapolates sensibly to TiO(2-x)); without ``start`` they are split arbitrarily
    and an absent element gets 0 eV.

    Args:
        frames: frames with energies (eV) in ``atoms.calc.results``.
        type_names: element symbols to fit.
        start: per-element energies (eV) the fit stays closest to; default 0 eV.

    Returns:
        {element: e_Z in eV}.

    Raises:
        DataError: no frames, a frame without energy, or an element not in ``type_names``.
    """
    if len(frames) == 0:
        raise DataError("no frames to fit energy references on")
    counts = composition_counts(frames, type_names).astype(np.float64)
    base = np.array([(start or {}).get(name, 0.0) for name in type_names], dtype=np.float64)
    solution = base + np.linalg.lstsq(counts, _energies(frames) - counts @ base, rcond=None)[0]
    return {name: float(e) for name, e in zip(type_names, solution)}


def referenced_energy_per_atom(frames: Sequence[ase.Atoms], references: dict[str, float]) -> np.ndarray:
    """(E − Σ_i e_{Z_i}) / N of every frame, in eV/atom.

    Args:
        frames: frames with energies (eV) in ``atoms.calc.results``.
        references: {element: e_Z in eV}, e.g. from :func:`fit_energy_references`.

    Returns:
        (n_frames,) referenced energies per atom (eV/atom).

    Raises:
        DataError: a frame without energy, or an element missing from ``references`` (names both).
    """
    names = list(references)
    counts = composition_counts(frames, names)
    reference = counts @ np.array([references[name] for name in names], dtype=np.float64)
    return (_energies(frames) - reference) / counts.sum(axis=1)


def filter_frames(
    frames: Sequence[ase.Atoms],
    references: dict[str, float],
    max_energy_per_atom: float | None = None,
    max_force: float | None = None,
) -> tuple[list[ase.Atoms], np.ndarray]:
    """Drop outliers: frames too high in referenced energy or with too large a force.

    Args:
        frames: frames with energy (eV) and, when ``max_force`` is given, forces (eV/Å).
        references: {element: e_Z in eV} for the referenced energy per atom.
        max_energy_per_atom: drop frames whose (E − Σ e_Z)/N exceeds this (eV/atom); None keeps all.
        max_force: drop frames whose largest absolute force component exceeds this (eV/Å); None keeps all.

    Returns:
        The kept frames and the (n_frames,) boolean keep-mask.

    Raises:
        DataError: a needed label or reference is missing.
    """
    keep = np.ones(len(frames), dtype=bool)
    if max_energy_per_atom is not None:
        keep &= referenced_energy_per_atom(frames, references) <= max_energy_per_atom
    if max_force is not None:
        for i, atoms in enumerate(frames):
            if atoms.calc is None or "forces" not in atoms.calc.results:
                raise DataError(f"frame {i}: no forces label, needed by max_force")
            keep[i] &= np.abs(atoms.calc.results["forces"]).max() <= max_force
    return [atoms for atoms, k in zip(frames, keep) if k], keep
