"""Atomic file writes: the one way this package replaces a file (state, checkpoints, samples, stores, logs);
the one way it appends rows to a run's log (:func:`appending_csv`); and the one way it reads a torch checkpoint
(:func:`load_checkpoint`: tensors and numbers only, never pickled objects).

A reader (or a run resumed after a kill) sees either the old file or the new one, never a half-written one:
the content goes to a temporary file in the target's folder, is flushed to disk (``fsync``) and then renamed
onto the target (``os.replace``, atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Sequence, Union

import torch


@contextlib.contextmanager
def atomic_write(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; it replaces ``path`` when the block ends.

    The temporary file lies next to ``path`` (its folder is created if needed) and keeps ``path``'s suffix, so
    that writers that look at it (``ase.io.write``, ``h5py``) see the right format. When the block raises, the
    temporary file is removed and ``path`` is left as it was.

    Args:
        path: the file to (re)write.

    Yields:
        The temporary path (the file exists, empty).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "state.json"
        >>> with atomic_write(target) as tmp:
        ...     _ = tmp.write_text('{"step": 1}')
        >>> target.read_text()
        '{"step": 1}'
        >>> sorted(p.name for p in target.parent.iterdir())  # no temporary file left behind
        ['state.json']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class RowWriter:
    """Writes rows of a CSV log, each handed to the operating system as it is written (so that a ``kill -9``
    loses none)."""

    def __init__(self, handle, fields: Sequence[str]):
        self._handle = handle
        self._writer = csv.DictWriter(handle, fieldnames=list(fields))

    def writerow(self, row: Dict) -> None:
        self._writer.writerow(row)
        self._handle.flush()


@contextlib.contextmanager
def appending_csv(path: Union[str, Path], fields: Sequence[str], key: str, start: int) -> Iterator[RowWriter]:
    """A writer of the rows of a run's CSV log (a trace, the epochs of a training) from ``key`` value ``start``.

    ``start`` 0: the log begins anew (its header, written atomically). Otherwise the run resumes from a
    checkpoint at ``start``: the rows before it are kept as they are on disk, those from ``start`` on (written
    by a killed run after its checkpoint, and written again by the resumed run) and a last line cut short by a
    kill are cut off the end of the file, and new rows are appended. So each ``key`` value appears once, in
    order, and no row before the checkpoint is rewritten.

    Args:
        path: the CSV file.
        fields: its columns.
        key: the integer column the rows are ordered by (``step``, ``epoch``).
        start: the ``key`` value of the first row the run will write.

    Yields:
        A :class:`RowWriter`; the file is ``fsync``-ed when the block ends.

    Example:
        >>> import tempfile, pathlib
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "trace.csv"
        >>> with appending_csv(log, ["step", "loss"], "step", 0) as rows:
        ...     for step in range(3):
        ...         rows.writerow({"step": step, "loss": 1.0 / (step + 1)})
        >>> with appending_csv(log, ["step", "loss"], "step", 2) as rows:  # resumed from a checkpoint at step 2
        ...     rows.writerow({"step": 2, "loss": 0.25})
        >>> print(log.read_text(), end="")
        step,loss
        0,1.0
        1,0.5
        2,0.25
    """
    path = Path(path)
    if start == 0 or not path.is_file():
        with atomic_write(path) as tmp:
            with open(tmp, "w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=list(fields)).writeheader()
    else:
        _cut_rows_from(path, key, start)
    with open(path, "a", newline="") as handle:
        try:
            yield RowWriter(handle, fields)
        finally:
            handle.flush()
            os.fsync(handle.fileno())


def _cut_rows_from(path: Path, key: str, start: int) -> None:
    """Truncate a CSV log before its first row whose ``key`` is ``start`` or more, or before a last line that
    lacks its line end."""
    with open(path, "rb+") as handle:
        lines = handle.read().splitlines(keepends=True)
        column = next(csv.reader([lines[0].decode()])).index(key) if lines else 0
        end = 0
        for number, line in enumerate(lines):
            if not line.endswith(b"\n"):
                break
            if number > 0 and int(next(csv.reader([line.decode()]))[column]) >= start:
                break
            end += len(line)
        handle.truncate(end)


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: a checkpoint of tensors, numbers, strings and containers of
    them, never unpickled Python objects.

    Args:
        path: the checkpoint (``.ckpt``, ``.pt``).
        map_location: the device its tensors are loaded to.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` cannot be loaded safely: it holds pickled Python objects (e.g. a whole pickled
            model, or a checkpoint of another program), or it is not a torch checkpoint; the error names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} cannot be loaded safely: it is not a weights-only torch file "
                         f"(it holds pickled Python objects, or is no torch checkpoint at all): {reason}") from None


def write_json(values, path) -> None:
    """``values`` as JSON (indent 2, NaN allowed, final newline), written atomically to ``path``."""
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(values, indent=2, allow_nan=True) + "\n")
