"""The converters of the public data sets (:data:`mlip_uq.datasets.REGISTRY`) to extended XYZ: rMD17 npz
(:func:`convert_rmd17_npz`), the aenet TiO2 XSF archive (:func:`convert_aenet_xsf_archive`, :func:`read_xsf`) and
files already in that format (:func:`copy_files`). A converter is ``convert(downloads, out_dir)``: it writes the
data set's files into ``out_dir`` from the downloaded files (``downloads``: download name -> path).
"""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path
from typing import Dict

import numpy as np


class DatasetError(ValueError):
    """A data set that cannot be fetched or named: unknown name, failed or interrupted download, checksum or
    fingerprint mismatch."""


def _write_extxyz(frames, path: Path) -> None:
    import ase.io

    from .files import atomic_write

    with atomic_write(path) as tmp:
        ase.io.write(tmp, frames, format="extxyz")


def copy_files(downloads: Dict[str, Path], out_dir: Path) -> None:
    """Converter of data sets distributed as extended XYZ: the downloaded files as they are."""
    for name, path in downloads.items():
        shutil.copyfile(path, out_dir / name)


def convert_rmd17_npz(downloads: Dict[str, Path], out_dir: Path) -> None:
    """Converter of rMD17 npz files (``rmd17_<molecule>_<split>.npz``: ``nuclear_charges``, ``coords`` Å,
    ``energies`` kcal/mol, ``forces`` kcal/mol/Å, ``old_indices``) to ``rmd17_<molecule>_<split>.extxyz``: energy
    (eV) and forces (eV/Å) in a ``SinglePointCalculator`` (kcal/mol x ``ase.units.kcal / ase.units.mol``), info
    ``rmd17_old_index``, ``molecule``, ``split``; no cell, no pbc."""
    import ase
    from ase import units
    from ase.calculators.singlepoint import SinglePointCalculator

    factor = units.kcal / units.mol
    for name, path in downloads.items():
        match = re.fullmatch(r"rmd17_(\w+?)_((?:train|test)_\d+)\.npz", name)
        if match is None:
            raise DatasetError(f"{name}: not an rMD17 file name (rmd17_<molecule>_<train|test>_<nn>.npz)")
        molecule, split = match.groups()
        data = np.load(path)
        frames = []
        for i in range(len(data["energies"])):
            atoms = ase.Atoms(numbers=data["nuclear_charges"], positions=data["coords"][i])
            atoms.info.update(rmd17_old_index=int(data["old_indices"][i]), molecule=molecule, split=split)
            atoms.calc = SinglePointCalculator(atoms, energy=float(data["energies"][i]) * factor,
                                               forces=np.asarray(data["forces"][i], dtype=np.float64) * factor)
            frames.append(atoms)
        _write_extxyz(frames, out_dir / name.replace(".npz", ".extxyz"))


def read_xsf(text: str, source_file: str):
    """One aenet XSF structure (``# total energy = E eV`` header; ``CRYSTAL``, ``PRIMVEC``, ``PRIMCOORD`` blocks
    with rows ``symbol x y z Fx Fy Fz``, Å and eV/Å) as ``ase.Atoms`` with a ``SinglePointCalculator``, or for
    an XSF without ``CRYSTAL`` a non-periodic structure; info ``source_file``."""
    import ase
    from ase.calculators.singlepoint import SinglePointCalculator

    lines = [line.strip() for line in text.splitlines()]
    energy = None
    for line in lines:
        match = re.match(r"#\s*total energy\s*=\s*(\S+)\s*eV", line, re.IGNORECASE)
        if match:
            energy = float(match.group(1))
    words = [line.split() for line in lines]
    keys = [w[0].upper() if w else "" for w in words]
    cell = None
    if "PRIMVEC" in keys:
        at = keys.index("PRIMVEC")
        cell = np.array([[float(x) for x in words[at + k][:3]] for k in (1, 2, 3)])
    block = "PRIMCOORD" if "PRIMCOORD" in keys else "ATOMS"
    if block not in keys:
        raise DatasetError(f"{source_file}: no PRIMCOORD or ATOMS block")
    at = keys.index(block)
    if block == "PRIMCOORD":
        count, rows = int(words[at + 1][0]), words[at + 2:]
    else:
        rows = words[at + 1:]
        count = next((i for i, w in enumerate(rows) if len(w) < 4), len(rows))
    rows = rows[:count]
    symbols = [r[0] for r in rows]
    positions = np.array([[float(x) for x in r[1:4]] for r in rows])
    forces = np.array([[float(x) for x in r[4:7]] for r in rows]) if all(len(r) >= 7 for r in rows) else None
    atoms = ase.Atoms(symbols=symbols, positions=positions, cell=cell, pbc=cell is not None)
    atoms.info["source_file"] = source_file
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def convert_aenet_xsf_archive(downloads: Dict[str, Path], out_dir: Path) -> None:
    """Converter of the aenet TiO2 set: every ``xsf/structureNNNN.xsf`` of the downloaded tar archive, in
    structure-number order, to ``tio2_aenet_7815.extxyz`` (energy eV, forces eV/Å, info ``source_file``; no
    filtering, unit change or energy referencing)."""
    (path,) = downloads.values()
    structures = []
    with tarfile.open(path) as archive:
        for member in archive:
            match = re.search(r"(?:^|/)xsf/(structure(\d+)\.xsf)$", member.name)
            if member.isfile() and match:
                text = archive.extractfile(member).read().decode()
                structures.append((int(match.group(2)), read_xsf(text, match.group(1))))
    if not structures:
        raise DatasetError(f"{path.name}: the archive holds no xsf/structureNNNN.xsf file")
    structures.sort(key=lambda item: item[0])
    _write_extxyz([atoms for _, atoms in structures], out_dir / "tio2_aenet_7815.extxyz")
