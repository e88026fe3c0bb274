"""Loop state (a small JSON file written atomically) and the decision log (JSON lines).

The state file is the loop's write-ahead record: a decision is first written into the state as ``pending``
(with the labelled structure), then appended to the decision log and committed to the HDF5 store, and only
then cleared. Whatever point a kill hits, the next start finishes the pending decision idempotently (the log
line and the store frame are each added only when absent), so no labelled structure is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, List

import ase
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator


def write_json_atomic(values: Dict, path: Path) -> None:
    """Write ``values`` as JSON to a temporary file next to ``path``, fsync it, and rename it onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(values, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Dict:
    """Read a JSON file, naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it was not written by this loop") from error


def bare_atoms(atoms: ase.Atoms) -> ase.Atoms:
    """A copy of the structure alone: numbers, positions, cell, pbc (no calculator, labels or momenta)."""
    return ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def atoms_to_dict(atoms: ase.Atoms, momenta: bool = False) -> Dict:
    """A structure (and the labels of its calculator, if any) as plain JSON values; float64 round-trips exactly.

    Args:
        atoms: the structure; labels are read from ``atoms.calc.results`` (``energy`` eV, ``forces`` eV/Å,
            ``stress`` Voigt eV/Å³) when its calculator is a ``SinglePointCalculator``.
        momenta: also keep the momenta (ASE units), e.g. of an MD walker.
    """
    out = {
        "numbers": atoms.numbers.tolist(),
        "positions": atoms.positions.tolist(),
        "cell": atoms.cell.array.tolist(),
        "pbc": atoms.pbc.tolist(),
    }
    if momenta:
        out["momenta"] = atoms.get_momenta().tolist()
    if isinstance(atoms.calc, SinglePointCalculator):
        out["labels"] = {k: np.asarray(v).tolist() for k, v in atoms.calc.results.items()
                         if k in ("energy", "forces", "stress")}
    return out


def atoms_from_dict(values: Dict) -> ase.Atoms:
    """Inverse of :func:`atoms_to_dict`."""
    atoms = ase.Atoms(numbers=values["numbers"], positions=values["positions"], cell=values["cell"],
                      pbc=values["pbc"])
    if "momenta" in values:
        atoms.set_momenta(np.asarray(values["momenta"], dtype=np.float64))
    if "labels" in values:
        labels = {k: (float(v) if k == "energy" else np.asarray(v, dtype=np.float64))
                  for k, v in values["labels"].items()}
        atoms.calc = SinglePointCalculator(atoms, **labels)
    return atoms


class DecisionLog:
    """The decision log: one JSON object per line, ``decision`` numbered from 0 without gaps.

    Args:
        path: the ``.jsonl`` file.
        acknowledged: decisions the loop state has committed; lines beyond them (written by a run that was
            killed before it could record them) and a torn last line are dropped on opening.
    """

    def __init__(self, path: Path, acknowledged: int):
        self.path = Path(path)
        records: List[Dict] = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line torn by a kill is always the last one
                if record.get("decision", -1) >= acknowledged:
                    break
                records.append(record)
        if len(records) != acknowledged:
            raise ValueError(f"{self.path} holds {len(records)} decisions, the loop state {acknowledged}: "
                             "the log and the state do not belong together")
        self.n = len(records)
        self._rewrite(records)

    def _rewrite(self, records: List[Dict]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        with os.fdopen(fd, "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def ensure(self, record: Dict) -> None:
        """Append ``record`` unless it is already there (its ``decision`` number must be the next or the last)."""
        number = record["decision"]
        if number < self.n:
            return
        if number != self.n:
            raise ValueError(f"decision {number} cannot follow decision {self.n - 1} in {self.path}")
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.n += 1

    def records(self) -> List[Dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def composition_key(atoms: ase.Atoms) -> str:
    """The element set of a structure (e.g. ``C-H-O``): what a rejection is remembered by."""
    return "-".join(sorted(set(atoms.get_chemical_symbols())))

