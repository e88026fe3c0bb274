"""Splits: disjoint, covering, reproducible, and holding out exactly what they claim."""

import ase.io
import numpy as np
import pytest
from scipy.cluster.vq import kmeans2

from mlip_uq.data import (
    DataError,
    cell_size_split,
    cluster_split,
    property_range_split,
    random_split,
    referenced_energy_per_atom,
)
from mlip_uq.data.splits import _descriptor, validation_picks


@pytest.fixture(scope="module")
def frames(tio2_path):
    return ase.io.read(tio2_path, "::4")  # 250 frames of 6-95 atoms, 5 formulas


def _check_partition(split, n):
    assert set(split) == {"train", "val", "test"}
    parts = [split[k] for k in ("train", "val", "test")]
    assert all(p.dtype == np.int64 and (np.diff(p) > 0).all() for p in parts)
    together = np.concatenate(parts)
    assert len(together) == n and set(together.tolist()) == set(range(n))


def test_random_split_sizes_and_seed():
    split = random_split(1000, val_fraction=0.1, test_fraction=0.2, seed=3)
    _check_partition(split, 1000)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (700, 100, 200)
    again, other = random_split(1000, 0.1, 0.2, seed=3), random_split(1000, 0.1, 0.2, seed=4)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["test"], other["test"])
    with pytest.raises(DataError, match=r"test_fraction must be in \[0, 1\)"):
        random_split(10, 0.1, 1.0, seed=0)
    with pytest.raises(DataError, match="no training frames left"):
        random_split(10, 0.5, 0.5, seed=0)


def test_property_range_split_tests_on_the_top(frames):
    values = referenced_energy_per_atom(frames, {"O": -432.503149303, "Ti": -1604.604515075})
    split = property_range_split(values, test_fraction=0.2, val_fraction=0.1, seed=0)
    _check_partition(split, len(frames))
    assert len(split["test"]) == 50 and len(split["val"]) == 25
    assert values[split["test"]].min() >= values[np.concatenate([split["train"], split["val"]])].max()
    assert np.array_equal(split["val"], property_range_split(values, 0.2, 0.1, seed=0)["val"])


def test_cell_size_split(frames):
    split = cell_size_split(frames, max_train_atoms=46, val_fraction=0.1, seed=1)
    _check_partition(split, len(frames))
    sizes = np.array([len(a) for a in frames])
    assert sizes[split["train"]].max() <= 46 and sizes[split["val"]].max() <= 46
    assert set(split["test"].tolist()) == set(np.flatnonzero(sizes > 46).tolist()) != set()


def test_composition_split_holds_out_whole_formulas(frames):
    formulas = np.array([a.get_chemical_formula(mode="hill", empirical=True) for a in frames])
    counts = dict(zip(*np.unique(formulas, return_counts=True)))
    held = [f for f in counts if f != "O2Ti"][:2]
    split = cluster_split(frames, by="composition", test_clusters=held, val_fraction=0.1, seed=0)
    _check_partition(split, len(frames))
    assert set(formulas[split["test"]]) == set(held) and len(split["test"]) == sum(counts[f] for f in held)
    assert not set(formulas[np.concatenate([split["train"], split["val"]])]) & set(held)

    by_fraction = cluster_split(frames, by="composition", test_fraction=0.3, seed=5)
    _check_partition(by_fraction, len(frames))
    assert not set(formulas[by_fraction["test"]]) & set(formulas[by_fraction["train"]])
    again = cluster_split(frames, by="composition", test_fraction=0.3, seed=5)
    assert np.array_equal(by_fraction["test"], again["test"])
    with pytest.raises(DataError, match=r"test cluster\(s\) \['Ti9'\] not among"):
        cluster_split(frames, test_clusters="Ti9")


def test_kmeans_split_holds_out_whole_clusters(frames):
    split = cluster_split(frames, by="kmeans", n_clusters=6, test_fraction=0.34, val_fraction=0.1, seed=2, r_max=4.0)
    _check_partition(split, len(frames))
    labels = kmeans2(_descriptor(frames, 4.0, 10), 6, seed=2, minit="++")[1]
    held = set(labels[split["test"]].tolist())
    assert 1 <= len(held) < 6 and np.isin(labels, list(held)).sum() == len(split["test"])
    again = cluster_split(frames, by="kmeans", n_clusters=6, test_fraction=0.34, val_fraction=0.1, seed=2, r_max=4.0)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    with pytest.raises(DataError, match="unknown cluster_split by='volume'"):
        cluster_split(frames, by="volume")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 1 / 3, 0.5])
def test_validation_picks_keep_the_fraction_and_never_move_a_structure(fraction):
    picks = validation_picks(40, fraction)
    for n in range(41):
        assert picks[:n].sum() == int(np.floor(n * fraction + 1e-9))  # the fraction, rounded down, at every size
        np.testing.assert_array_equal(validation_picks(n, fraction), picks[:n])  # growing never reassigns
    with pytest.raises(DataError, match="val_fraction"):
        validation_picks(3, 1.0)
