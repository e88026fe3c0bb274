"""Structure sources of an active-learning run: the ``initial`` and ``test`` sections, ``explore.starts`` and
``explore.pool``, each a file, the frames read from it, and a seeded draw of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Literal, Optional, Tuple, Union

import ase
import numpy as np

from ..data import read_frames
from ..settings import ConfigError
from .state import bare_atoms


@dataclass(frozen=True)
class SourceOptions:
    """Structures read from a file.

    Args:
        path: the file (resolved against the configuration's folder); None only for ``explore.starts``, which
            then reads the initial set's file.
        index: the frames read, as ASE's ``index`` (``":"`` all, ``"0:1000:500"``, ``3``).
        n: this many of them, drawn at random (seeded, kept in file order); None: all.
        max_atoms: only structures of at most this many atoms; None: all.
    """

    path: Optional[str] = None
    index: Union[str, int] = ":"
    n: Optional[int] = None
    max_atoms: Optional[int] = None


@dataclass(frozen=True)
class InitialOptions(SourceOptions):
    """The ``initial`` section: the starting structures (:class:`SourceOptions`; ``path`` required).

    Args:
        labels: ``oracle`` (labelled by the reference calculator, so that training data and reference agree) or
            ``file`` (the file's labels kept).
    """

    labels: Literal["oracle", "file"] = "oracle"


def pick_structures(source: SourceOptions, seed: int, exclude: Iterable[int] = (), labelled: bool = False
                    ) -> Tuple[List[ase.Atoms], List[int]]:
    """The structures of a source: frames ``index`` of ``path``, those with at most ``max_atoms`` atoms, ``n`` of
    them drawn at random (seeded, kept in file order), none of the positions ``exclude``; without labels unless
    ``labelled`` (then energy and forces are required). Returns them with their positions in the selection read
    from the file.

    Raises:
        ConfigError: no structure is left.
    """
    frames = read_frames(source.path, index=source.index, require=("energy", "forces") if labelled else ())
    excluded = set(exclude)
    indices = [i for i in range(len(frames))
               if i not in excluded and (source.max_atoms is None or len(frames[i]) <= source.max_atoms)]
    if not indices:
        raise ConfigError(f"{source.path}: no structure selected (index {source.index!r}, max_atoms "
                          f"{source.max_atoms})")
    if source.n is not None and source.n < len(indices):
        indices = sorted(np.random.default_rng(seed).choice(indices, size=int(source.n), replace=False).tolist())
    return [frames[i] if labelled else bare_atoms(frames[i]) for i in indices], indices
