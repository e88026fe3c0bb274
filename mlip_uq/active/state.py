"""Loop state (:class:`LoopState`, a small JSON file written atomically), the decision log (JSON lines) and the
write-ahead commit of a decision (:class:`Journal`).

The state file is the loop's write-ahead record: a decision is first written into the state as ``pending``
(with the labelled structure), then appended to the decision log and committed to the HDF5 store, and only
then cleared. Whatever point a kill hits, the next start finishes the pending decision idempotently (the log
line and the store frame are each added only when absent), so no labelled structure is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import ase
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from ..data import FrameStore, frames_fingerprint
from ..files import atomic_write, write_json


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
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))

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



FORMAT = "mlip_uq.ActiveLoop"
#: the parts of the wall time counted separately (``total`` besides)
TIMING_KEYS = ("oracle", "update", "explore", "evaluate")


@dataclass
class LoopState:
    """The state of an active-learning loop, saved as ``state.json`` (keys in this order).

    Attributes:
        phase: ``initial`` (labelling the initial set), ``explore`` or ``done``.
        n_decisions: decisions committed (= lines of ``decisions.jsonl``).
        n_labelled: structures in ``labelled.h5``.
        n_initial_labelled: how many of them belong to the initial set (None while it is being labelled).
        calls: reference calls by phase (``initial``, ``explore``, ``test``).
        initial: ``{indices, next}``: the initial structures chosen and the next to label.
        pending: the decision being committed (``{record, frame}``), or None.
        update: ``{count, pending, started}``: posterior fits done, one due, the due one begun.
        posterior: the current posterior file, relative to the output folder.
        explorer: the explorer's state (its :meth:`~mlip_uq.active.explore.Explorer.state_dict`, opaque here:
            MD walkers, or the pool's candidates used and batch to label).
        rule: the rule's state (:meth:`state_dict`).
        rejected: compositions the reference rejected, with its message.
        history: one entry per posterior fit (counts, test metrics, calibration).
        timings: wall time in seconds by :data:`TIMING_KEYS` and ``total``.
        stop_reason: why the loop stopped (None while it runs).
    """

    format: str = FORMAT
    version: int = 2
    phase: str = "initial"
    n_decisions: int = 0
    n_labelled: int = 0
    n_initial_labelled: Optional[int] = None
    calls: Dict[str, int] = field(default_factory=lambda: {"initial": 0, "explore": 0, "test": 0})
    initial: Dict[str, Any] = field(default_factory=lambda: {"indices": [], "next": 0})
    pending: Optional[Dict] = None
    update: Dict[str, Any] = field(default_factory=lambda: {"count": 0, "pending": False, "started": False})
    posterior: Optional[str] = None
    explorer: Dict[str, Any] = field(default_factory=dict)
    rule: Dict = field(default_factory=dict)
    rejected: Dict[str, str] = field(default_factory=dict)
    history: List[Dict] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=lambda: {**{k: 0.0 for k in TIMING_KEYS}, "total": 0.0})
    stop_reason: Optional[str] = None

    @classmethod
    def read(cls, path: Path) -> "LoopState":
        """The state in ``path``.

        Raises:
            ValueError: the file is not the state of an active-learning loop.
        """
        values = read_json(path)
        if values.get("format") != FORMAT:
            raise ValueError(f"{path} is not the state of an active-learning loop")
        if "explorer" not in values:  # version 1: the explorer's fields at the top level
            old = {key: values.pop(key) for key in ("walkers", "current_walker", "md_steps", "pool") if key in values}
            values["explorer"] = ({key: old[key] for key in ("walkers", "current_walker", "md_steps")}
                                  if old.get("walkers") else old["pool"])
            values["version"] = 2
        return cls(**values)

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @property
    def md_steps(self) -> int:
        """MD steps run by the explorer's walkers (the ``md_steps`` of its state; 0 for a pool)."""
        return int(self.explorer.get("md_steps", 0))

    @property
    def n_calls(self) -> int:
        """Reference calls for training data (initial set and exploration; the test set not counted)."""
        return self.calls["initial"] + self.calls["explore"]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class Journal:
    """The loop state and the files it is written ahead of: ``state.json``, ``decisions.jsonl`` and the
    FrameStore ``labelled.h5``.

    Order of a decision (:meth:`commit`): the state is written with the decision ``pending`` (labels included),
    the decision is appended to the log, the structure to the store, and the state is written again without
    ``pending`` (and, during exploration, with an update due). :meth:`finish_pending` repeats the steps after
    the first idempotently, so a kill at any point loses or duplicates nothing.

    Args:
        out: the loop's output folder.
        state: the state (read from ``out/state.json``, or new).
        rule: the loop's rule; its state is saved with the loop state.
        type_names: element names of the store.
        r_max: cutoff of the store's neighbour lists (Å).
        explorer: the loop's explorer; its state is saved with the loop state (None: the state's own).
    """

    def __init__(self, out: Path, state: LoopState, rule, type_names: List[str], r_max: float, explorer=None):
        self.out, self.state, self.rule, self.explorer = Path(out), state, rule, explorer
        self.state_path, self.store_path = self.out / "state.json", self.out / "labelled.h5"
        self.type_names, self.r_max = type_names, r_max
        self.log = DecisionLog(self.out / "decisions.jsonl", state.n_decisions)
        self._t0, self._total0 = time.perf_counter(), state.timings["total"]

    def save(self) -> None:
        """Write the state (with the rule's and the explorer's state and the total wall time) atomically."""
        self.state.rule = self.rule.state_dict()
        if self.explorer is not None:
            self.state.explorer = self.explorer.state_dict()
        self.state.timings["total"] = self._total0 + (time.perf_counter() - self._t0)
        write_json(self.state.to_dict(), self.state_path)

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[key]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.state.timings[key] += time.perf_counter() - start

    def commit(self, record: Dict, labelled: Optional[ase.Atoms]) -> None:
        """Record a decision (and its labelled structure) write-ahead, then finish it."""
        record = {"decision": self.state.n_decisions, "time": _now(), **record}
        if labelled is not None:
            record["store_index"] = self.state.n_labelled
        self.state.pending = {"record": record, "frame": None if labelled is None else atoms_to_dict(labelled)}
        self.save()
        self.finish_pending()

    def finish_pending(self) -> None:
        """Finish the pending decision: log line and store frame, each added only when absent."""
        pending = self.state.pending
        record = pending["record"]
        self.log.ensure(record)
        if pending["frame"] is not None:
            index = record["store_index"]
            atoms = atoms_from_dict(pending["frame"])
            n = len(FrameStore.open(self.store_path)) if self.store_path.is_file() else 0
            if n == index:
                if n == 0:
                    FrameStore.create(self.store_path, [atoms], self.type_names, self.r_max, source="active learning")
                else:
                    FrameStore.open(self.store_path).append([atoms])
            elif n != index + 1 or (frames_fingerprint(FrameStore.open(self.store_path).atoms([index]))
                                    != frames_fingerprint([atoms])):
                raise RuntimeError(f"{self.store_path} holds {n} structures, the loop state expects {index} before "
                                   "this decision: the store and the state do not belong together")
            self.state.n_labelled = index + 1
            if self.state.phase == "explore":
                self.state.update["pending"] = True
        self.state.n_decisions = record["decision"] + 1
        self.state.pending = None
        self.save()
