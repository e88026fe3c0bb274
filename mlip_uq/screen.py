"""Offline committee deviation: per-frame max per-atom force std of a trajectory (``mlip-uq screen``).

The DeePMD-style screen of a production run made with one exported model (e.g. the posterior-mean model under
``pair_nequip``): every frame of any ASE-readable trajectory (a LAMMPS ``dump custom`` via ASE's
``lammps-dump-text`` reader, extxyz, ASE ``.traj``) is evaluated by the posterior's
:class:`~mlip_uq.calculator.UQCalculator`, and one CSV row per frame gives the largest and the mean per-atom force
std (``atom_force_std``, recalibrated, eV/Å), the largest epistemic part (``atom_force_std_epistemic``), the atom
that has the largest std, and the energy std (eV). Frames above a threshold are the candidates for relabelling.

A LAMMPS dump stores types, not elements: ``types`` maps LAMMPS type i to element ``types[i - 1]`` (default: the
posterior's type names in order), as ``mlip-uq lammps`` does. A dump with ``element`` column needs no mapping.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import ase
import ase.io
import numpy as np

from .files import atomic_write
from .result_keys import ATOM_FORCE_STD, ATOM_FORCE_STD_EPISTEMIC, ENERGY, ENERGY_STD

log = logging.getLogger(__name__)

COLUMNS = ("frame", "step", "n_atoms", "max_atom_force_std", "mean_atom_force_std", "max_atom_force_std_epistemic",
           "argmax_atom", "energy_std", "energy")


def read_trajectory(path: Union[str, Path], format: Optional[str] = None, index: str = ":",
                    types: Optional[Sequence[str]] = None) -> List[ase.Atoms]:
    """The frames of ``path`` (any ASE format; ``*.lammpstrj``/``*.dump`` are read as ``lammps-dump-text``), with
    LAMMPS types mapped to ``types`` (type 1 first; ASE's ``specorder``) where the dump has no ``element`` column.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no frames, or a LAMMPS type without an element (from ASE's reader: IndexError).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory {path} does not exist")
    if format is None and (path.suffix in (".lammpstrj", ".dump") or path.name.startswith("dump.")):
        format = "lammps-dump-text"
    kwargs = {"specorder": list(types)} if format == "lammps-dump-text" and types else {}
    frames = ase.io.read(path, index=index, format=format, **kwargs)
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise ValueError(f"{path} holds no frames (index {index!r})")
    return frames


def screen_trajectory(
    posterior,
    trajectory: Union[str, Path],
    out: Optional[Union[str, Path]] = None,
    format: Optional[str] = None,
    index: str = ":",
    types: Optional[Sequence[str]] = None,
    device: str = "cpu",
    dtype: Optional[str] = None,
) -> List[Dict]:
    """Per-frame committee deviation of ``trajectory`` (module docstring).

    Args:
        posterior: a :class:`~mlip_uq.posterior.Posterior`, a posterior file or a :class:`UQCalculator`.
        trajectory: any ASE-readable file of frames.
        out: CSV file to write (atomically), columns :data:`COLUMNS`; None writes nothing.
        format: ASE format (default: from the file name; LAMMPS dumps as described).
        index: ASE index of the frames (default: all).
        types: element of each LAMMPS type (dumps without elements; default: the posterior's type names).
        device, dtype: of the calculator when ``posterior`` is not one.

    Returns:
        One dict per frame with the keys :data:`COLUMNS` (eV/Å, eV).
    """
    from .calculator import UQCalculator

    calc = posterior if isinstance(posterior, UQCalculator) else UQCalculator(posterior, device=device, dtype=dtype)
    types = list(types) if types else list(calc.posterior.config.type_names)
    frames = read_trajectory(trajectory, format=format, index=index, types=types)
    rows = []
    for i, frame in enumerate(frames):
        atoms = ase.Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        atoms.calc = calc
        std = np.asarray(calc.get_property(ATOM_FORCE_STD, atoms))
        epi = np.asarray(calc.get_property(ATOM_FORCE_STD_EPISTEMIC, atoms))
        step = frame.info.get("timestep", frame.info.get("step", i))
        rows.append({"frame": i, "step": int(step), "n_atoms": len(atoms), "max_atom_force_std": float(std.max()),
                     "mean_atom_force_std": float(std.mean()), "max_atom_force_std_epistemic": float(epi.max()),
                     "argmax_atom": int(std.argmax()), "energy_std": float(calc.get_property(ENERGY_STD, atoms)),
                     "energy": float(calc.get_property(ENERGY, atoms))})
    if out is not None:
        with atomic_write(out) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    log.info("screen: %d frames of %s, max atom_force_std %.4g eV/Å (frame %d)", len(rows), trajectory,
             max(r["max_atom_force_std"] for r in rows), max(rows, key=lambda r: r["max_atom_force_std"])["frame"])
    return rows
