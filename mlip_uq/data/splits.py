"""Train/validation/test splits, random and out-of-distribution.

Every function returns ``{"train", "val", "test"}`` -> sorted int64 frame indices, disjoint and covering all
frames. Fractions are of all frames; ``val`` is always drawn at random (with ``seed``) from the frames not in
``test``, so out-of-distribution splits hold out exactly the named part as ``test``.

The ``data.split`` section of a run configuration is one of the option types at the end, one per ``kind``
(:data:`SPLITS`); each splits frames with its function (:meth:`RandomSplit.split`).
"""

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Literal, Optional, Sequence, Union

import ase
import numpy as np
from scipy.cluster.vq import kmeans2

from .frames import DataError, neighbor_pairs
from .references import composition_counts, referenced_energy_per_atom


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise DataError(f"{name} must be in [0, 1), got {value}")


def _with_val(n: int, test: np.ndarray, val_fraction: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Complete a split: val drawn at random from the frames outside ``test``, train the rest."""
    _check_fraction("val_fraction", val_fraction)
    rest = np.setdiff1d(np.arange(n), test)
    n_val = round(val_fraction * n)
    if n_val >= len(rest):
        raise DataError(f"no training frames left: {len(rest)} of {n} frames outside test, {n_val} of them for val")
    val = rng.choice(rest, size=n_val, replace=False)
    return {
        "train": np.setdiff1d(rest, val).astype(np.int64),
        "val": np.sort(val).astype(np.int64),
        "test": np.sort(test).astype(np.int64),
    }


def validation_picks(n_new: int, val_fraction: float) -> np.ndarray:
    """Which of ``n_new`` structures added one by one go to validation: structure j (0-based) when
    floor((j + 1) * val_fraction) > floor(j * val_fraction), so that ``floor(n * val_fraction)`` of the first n
    are validation structures for every n and adding structures never moves an earlier one.

    Returns a boolean mask of length ``n_new``.
    """
    _check_fraction("val_fraction", val_fraction)
    j = np.arange(n_new)
    return np.floor((j + 1) * val_fraction + 1e-9) > np.floor(j * val_fraction + 1e-9)


def random_split(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Uniformly random split of ``n`` frames.

    Args:
        n: number of frames.
        val_fraction: fraction of frames in ``val`` (rounded to the nearest count).
        test_fraction: fraction of frames in ``test`` (rounded).
        seed: seed of ``numpy.random.default_rng``.
    """
    _check_fraction("test_fraction", test_fraction)
    rng = np.random.default_rng(seed)
    return _with_val(n, rng.choice(n, size=round(test_fraction * n), replace=False), val_fraction, rng)


def property_range_split(
    values: Sequence[float], test_fraction: float, val_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Extrapolation split: train on the lower part, test on the top.

    The ``round(test_fraction * n)`` frames with the highest ``values`` (e.g. referenced energy per atom, eV/atom)
    form ``test``, so ``min(values[test]) >= max(values[train + val])``; ``val`` is random from the rest.

    Args:
        values: (n,) one number per frame.
        test_fraction: fraction of frames in ``test``.
        val_fraction: fraction of frames in ``val``.
        seed: seed for ``val``.
    """
    _check_fraction("test_fraction", test_fraction)
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise DataError("property_range_split: values contain NaN or inf")
    n_test = round(test_fraction * len(values))
    test = np.argsort(values, kind="stable")[len(values) - n_test :]
    return _with_val(len(values), test, val_fraction, np.random.default_rng(seed))


def cell_size_split(
    frames: Sequence[ase.Atoms], max_train_atoms: int, val_fraction: float = 0.1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Size-extrapolation split: train and validate on cells of up to ``max_train_atoms`` atoms, test on larger.

    Args:
        frames: the frames.
        max_train_atoms: largest number of atoms of a frame outside ``test``.
        val_fraction: fraction of all frames in ``val`` (from the small cells).
        seed: seed for ``val``.
    """
    sizes = np.array([len(atoms) for atoms in frames])
    return _with_val(len(frames), np.flatnonzero(sizes > max_train_atoms), val_fraction, np.random.default_rng(seed))


def cluster_split(
    frames: Sequence[ase.Atoms],
    by: Literal["composition", "kmeans"] = "composition",
    test_clusters: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    n_clusters: int = 10,
    val_fraction: float = 0.1,
    seed: int = 0,
    r_max: float = 5.0,
    n_bins: int = 10,
) -> dict[str, np.ndarray]:
    """Hold out whole clusters of similar frames as ``test``.

    ``by="composition"``: a cluster is a reduced chemical formula (Hill order, divided by the greatest common
    divisor, e.g. ``"O2Ti"`` for any TiO2 cell). ``test_clusters`` names the held-out formulas; without it,
    ``round(test_fraction * n_formulas)`` formulas (at least one) are chosen with ``seed``.

    ``by="kmeans"``: ``scipy.cluster.vq.kmeans2`` (k-means++, ``seed``) into ``n_clusters`` clusters of a
    standardized per-frame descriptor: composition fractions plus, for each element, the histogram of
    neighbour distances within ``r_max`` (``n_bins`` bins, per atom of that element). A ``test_fraction`` of
    the non-empty clusters (at least one) is held out.

    Args:
        frames: the frames.
        by: ``"composition"`` or ``"kmeans"``.
        test_clusters: formula(s) to hold out, e.g. ``["O15Ti8"]`` (composition only).
        test_fraction: fraction of clusters held out when ``test_clusters`` is not given.
        n_clusters: number of k-means clusters.
        val_fraction: fraction of all frames in ``val`` (from the frames not held out).
        seed: seed for the cluster choice, k-means and ``val``.
        r_max: cutoff (Å) of the distance histograms.
        n_bins: bins of each distance histogram.

    Raises:
        DataError: unknown ``by``, a formula in ``test_clusters`` absent from the frames, ``test_clusters``
            with k-means, or a held-out set that leaves no cluster to train on.
    """
    rng = np.random.default_rng(seed)
    if by == "composition":
        labels = np.array([atoms.get_chemical_formula(mode="hill", empirical=True) for atoms in frames])
    elif by == "kmeans":
        if test_clusters is not None:
            raise DataError("test_clusters names formulas and applies to by='composition' only")
        labels = kmeans2(_descriptor(frames, r_max, n_bins), n_clusters, seed=seed, minit="++")[1]
    else:
        raise DataError(f"unknown cluster_split by={by!r}; use 'composition' or 'kmeans'")
    clusters = np.unique(labels)
    if isinstance(test_clusters, str):
        test_clusters = [test_clusters]
    if test_clusters is None:
        _check_fraction("test_fraction", test_fraction)
        test_clusters = rng.choice(clusters, size=max(1, round(test_fraction * len(clusters))), replace=False)
    unknown = sorted(set(test_clusters) - set(clusters.tolist()))
    if unknown:
        raise DataError(f"test cluster(s) {unknown} not among the frames' formulas {clusters.tolist()}")
    if len(set(test_clusters)) >= len(clusters):
        raise DataError(f"holding out {len(set(test_clusters))} of {len(clusters)} clusters leaves none to train on")
    return _with_val(len(frames), np.flatnonzero(np.isin(labels, list(test_clusters))), val_fraction, rng)


def _descriptor(frames: Sequence[ase.Atoms], r_max: float, n_bins: int) -> np.ndarray:
    """(n_frames, n_el * (1 + n_bins)) standardized composition fractions and per-element distance histograms."""
    elements = sorted({symbol for atoms in frames for symbol in atoms.get_chemical_symbols()})
    counts = composition_counts(frames, elements)
    histograms = np.zeros((len(frames), len(elements), n_bins))
    for f, atoms in enumerate(frames):
        first, distance = neighbor_pairs(atoms, r_max, "id")
        element = np.searchsorted(elements, np.array(atoms.get_chemical_symbols())[first])
        bins = np.minimum((distance / r_max * n_bins).astype(np.int64), n_bins - 1)
        np.add.at(histograms[f], (element, bins), 1.0)
    histograms /= np.maximum(counts, 1)[:, :, None]
    features = np.hstack([counts / counts.sum(axis=1, keepdims=True), histograms.reshape(len(frames), -1)])
    spread = features.std(axis=0)
    return (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)


@dataclass(frozen=True)
class RandomSplit:
    """``data.split`` of kind ``random``: :func:`random_split`.

    Args:
        val_fraction: fraction of frames in ``val``.
        test_fraction: fraction of frames in ``test`` (0 with a separate test file).
    """

    kind: ClassVar[str] = "random"
    val_fraction: float
    test_fraction: float

    def split(self, frames: Sequence[ase.Atoms], seed: int, references: Dict[str, float]) -> dict[str, np.ndarray]:
        """The split of ``frames`` (``references``: element energies in eV, read by the kinds that need them)."""
        return random_split(len(frames), self.val_fraction, self.test_fraction, seed)


@dataclass(frozen=True)
class PropertyRangeSplit:
    """``data.split`` of kind ``property_range``: :func:`property_range_split` on the referenced energy per atom
    (eV/atom, comparable across compositions), the highest in ``test``.

    Args:
        val_fraction: fraction of frames in ``val``.
        test_fraction: fraction of frames in ``test`` (0 with a separate test file).
    """

    kind: ClassVar[str] = "property_range"
    val_fraction: float
    test_fraction: float

    def split(self, frames: Sequence[ase.Atoms], seed: int, references: Dict[str, float]) -> dict[str, np.ndarray]:
        return property_range_split(referenced_energy_per_atom(frames, references), self.test_fraction,
                                    self.val_fraction, seed)


@dataclass(frozen=True)
class CompositionSplit:
    """``data.split`` of kind ``composition``: :func:`cluster_split` by reduced formula (its arguments)."""

    kind: ClassVar[str] = "composition"
    test_clusters: Optional[List[str]] = None
    test_fraction: float = 0.2
    n_clusters: int = 10
    val_fraction: float = 0.1
    r_max: float = 5.0
    n_bins: int = 10

    def split(self, frames: Sequence[ase.Atoms], seed: int, references: Dict[str, float]) -> dict[str, np.ndarray]:
        return cluster_split(frames, by=self.kind, test_clusters=self.test_clusters, test_fraction=self.test_fraction,
                             n_clusters=self.n_clusters, val_fraction=self.val_fraction, seed=seed, r_max=self.r_max,
                             n_bins=self.n_bins)


@dataclass(frozen=True)
class KMeansSplit(CompositionSplit):
    """``data.split`` of kind ``kmeans``: :func:`cluster_split` by k-means clusters of a structure descriptor."""

    kind: ClassVar[str] = "kmeans"


@dataclass(frozen=True)
class CellSizeSplit:
    """``data.split`` of kind ``cell_size``: :func:`cell_size_split`, the cells above ``max_train_atoms`` atoms in
    ``test``.

    Args:
        max_train_atoms: largest number of atoms of a frame outside ``test``.
        val_fraction: fraction of all frames in ``val``.
    """

    kind: ClassVar[str] = "cell_size"
    max_train_atoms: int
    val_fraction: float = 0.1

    def split(self, frames: Sequence[ase.Atoms], seed: int, references: Dict[str, float]) -> dict[str, np.ndarray]:
        return cell_size_split(frames, self.max_train_atoms, self.val_fraction, seed)


#: the option type of each ``data.split.kind``
SPLITS = {cls.kind: cls for cls in (RandomSplit, PropertyRangeSplit, CompositionSplit, KMeansSplit, CellSizeSplit)}
#: a ``data.split`` section
Split = Union[RandomSplit, PropertyRangeSplit, CompositionSplit, KMeansSplit, CellSizeSplit]
