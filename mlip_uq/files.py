"""Atomic file writes: the one way this package replaces a file (state, checkpoints, samples, stores, logs).

A reader (or a run resumed after a kill) sees either the old file or the new one, never a half-written one:
the content goes to a temporary file in the target's folder, is flushed to disk (``fsync``) and then renamed
onto the target (``os.replace``, atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union


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
