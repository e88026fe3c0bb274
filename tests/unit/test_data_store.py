"""FrameStore: round trips against atoms_to_graph, append, reuse, corrupt files, interrupted writes."""

import h5py
import numpy as np
import pytest
import torch
from ase.build import fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from mlip_uq.data import (
    DataError,
    FrameStore,
    atoms_to_graph,
    frames_fingerprint,
    read_frames,
    referenced_energy_per_atom,
)
from mlip_uq.data import store as store_module

TYPES = ["O", "Ti"]
REFS = {"O": -432.503149303, "Ti": -1604.604515075}


@pytest.fixture(scope="module")
def frames(tio2_path):
    return read_frames(tio2_path, index=":12")


def _assert_graphs_equal(mine, theirs):
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _assert_atoms_equal(mine, theirs):
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert (a.numbers == b.numbers).all() and (a.pbc == b.pbc).all()
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell.array, b.cell.array)
        assert a.calc.results.keys() == b.calc.results.keys()
        for key, value in a.calc.results.items():
            np.testing.assert_array_equal(value, b.calc.results[key])


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_create_open_round_trip(frames, tmp_path, dtype):
    path = tmp_path / "store.h5"
    FrameStore.create(path, frames, TYPES, 4.0, references=REFS, source="unit test")
    store = FrameStore.open(path)
    assert len(store) == len(frames) and store.type_names == TYPES and store.r_max == 4.0
    assert store.references == REFS and store.source == "unit test"
    assert store.fingerprint == frames_fingerprint(frames) == frames_fingerprint(store.atoms())
    _assert_graphs_equal(store.graphs(dtype=dtype), [atoms_to_graph(a, TYPES, 4.0, dtype=dtype) for a in frames])
    subset = [atoms_to_graph(frames[i], TYPES, 4.0, dtype=dtype) for i in (5, 2)]
    _assert_graphs_equal(store.graphs([5, 2], dtype=dtype), subset)
    _assert_atoms_equal(store.atoms(), frames)
    np.testing.assert_allclose(store.energy_per_atom(), referenced_energy_per_atom(frames, REFS), rtol=0, atol=1e-12)


def test_mixed_labels_pbc_and_stress(tmp_path):
    slab = fcc111("Cu", (2, 2, 2), vacuum=4.0)  # mixed pbc, with stress
    slab.calc = SinglePointCalculator(slab, energy=-10.0, forces=np.ones((8, 3)), stress=np.arange(6.0))
    water = molecule("H2O")  # no cell, energy only
    water.calc = SinglePointCalculator(water, energy=-14.0)
    frames = [slab, water]
    store = FrameStore.create(tmp_path / "mixed.h5", frames, ["H", "O", "Cu"], 3.0)
    _assert_atoms_equal(store.atoms(), frames)
    _assert_graphs_equal(store.graphs(), [atoms_to_graph(a, ["H", "O", "Cu"], 3.0) for a in frames])
    np.testing.assert_allclose(store.energy_per_atom(), [-10.0 / 8, -14.0 / 3])


def test_append_keeps_old_frames(frames, tmp_path):
    store = FrameStore.create(tmp_path / "store.h5", frames[:7], TYPES, 4.0)
    store.append(frames[7:])
    assert len(store) == len(frames) == len(FrameStore.open(store.path))
    assert store.fingerprint == frames_fingerprint(frames)
    _assert_atoms_equal(store.atoms(), frames)
    _assert_graphs_equal(store.graphs(), [atoms_to_graph(a, TYPES, 4.0) for a in frames])
    with pytest.raises(DataError, match="not in type_names"):
        store.append([molecule("CH4")])


def test_for_frames_reuses_and_rebuilds(frames, tmp_path, monkeypatch):
    created = []
    original = FrameStore.create.__func__
    counting = classmethod(lambda cls, *args, **kwargs: created.append(args) or original(cls, *args, **kwargs))
    monkeypatch.setattr(FrameStore, "create", counting)

    path = tmp_path / "store.h5"
    store = FrameStore.for_frames(path, frames, TYPES, 4.0, source="data.extxyz")
    assert len(created) == 1 and store.source == "data.extxyz"
    mtime = path.stat().st_mtime_ns
    again = FrameStore.for_frames(path, frames, TYPES, 4.0)
    assert len(created) == 1 and path.stat().st_mtime_ns == mtime and again.fingerprint == store.fingerprint
    rebuilt = FrameStore.for_frames(path, frames, TYPES, 3.5)
    assert len(created) == 2 and rebuilt.r_max == 3.5 == FrameStore.open(path).r_max
    assert len(FrameStore.for_frames(path, frames[:5], TYPES, 3.5)) == 5 and len(created) == 3  # data changed


def test_bad_store_files(frames, tmp_path):
    good = tmp_path / "good.h5"
    FrameStore.create(good, frames[:3], TYPES, 4.0)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"truncated\.h5: not a readable HDF5 file"):
        FrameStore.open(truncated)
    text = tmp_path / "text.h5"
    text.write_text("energy=1.0\n")
    with pytest.raises(DataError, match=r"text\.h5: not a readable HDF5 file"):
        FrameStore.open(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(DataError, match=r"foreign\.h5: not a FrameStore \(format attribute None"):
        FrameStore.open(foreign)
    with pytest.raises(DataError, match="not a FrameStore"):  # never overwritten by for_frames
        FrameStore.for_frames(foreign, frames[:3], TYPES, 4.0)
    with h5py.File(good, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(DataError, match="format version 99"):
        FrameStore.open(good)
    with pytest.raises(DataError, match="FrameStore file not found"):
        FrameStore.open(tmp_path / "missing.h5")


def test_interrupted_write_keeps_old_store(frames, tmp_path, monkeypatch):
    store = FrameStore.create(tmp_path / "store.h5", frames[:4], TYPES, 4.0)
    before = store.path.read_bytes()

    def fail_halfway(file, arrays, attrs):
        file.create_dataset("atoms/numbers", data=arrays["numbers"])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(store_module, "_fill", fail_halfway)
    with pytest.raises(KeyboardInterrupt):
        store.append(frames[4:])
    with pytest.raises(KeyboardInterrupt):
        FrameStore.create(store.path, frames, TYPES, 4.0)
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.h5"]
    reopened = FrameStore.open(store.path)
    assert len(reopened) == 4 and reopened.fingerprint == frames_fingerprint(frames[:4])
