"""atoms_to_graph: neighbour list against ASE, types, labels, dtypes; collate."""

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list
from nequip.data import AtomicDataDict

from mlip_uq.data import DataError, atoms_to_graph, collate

K = AtomicDataDict


def _edge_set(graph) -> set:
    i, j = graph[K.EDGE_INDEX_KEY].tolist()
    shifts = graph[K.EDGE_CELL_SHIFT_KEY].round().long().tolist()
    return {(a, b, tuple(s)) for a, b, s in zip(i, j, shifts)}


def _ase_edge_set(atoms, r_max) -> set:
    i, j, shifts = neighbor_list("ijS", atoms, r_max)
    return {(a, b, tuple(s)) for a, b, s in zip(i.tolist(), j.tolist(), shifts.tolist())}


@pytest.fixture(scope="module")
def tio2_cell(tio2_path):
    return ase.io.read(tio2_path, 0)


def test_neighbour_list_matches_ase_periodic(tio2_cell):
    graph = atoms_to_graph(tio2_cell, ["O", "Ti"], 5.0)
    assert _edge_set(graph) == _ase_edge_set(tio2_cell, 5.0)
    assert len(_edge_set(graph)) == graph[K.EDGE_INDEX_KEY].shape[1] > 100


@pytest.mark.parametrize(
    "atoms, r_max",
    [
        (molecule("CH3CH2OH"), 2.5),
        (bulk("Cu", "fcc", a=3.6), 6.0),  # r_max larger than the whole 2.5 Å primitive cell
        (fcc111("Cu", (2, 2, 3), vacuum=5.0), 5.0),  # mixed pbc (T, T, F): matscipy backend
    ],
    ids=["molecule", "small_cell", "slab"],
)
def test_neighbour_list_matches_ase(atoms, r_max):
    graph = atoms_to_graph(atoms, sorted(set(atoms.get_chemical_symbols())), r_max, with_labels=False)
    assert _edge_set(graph) == _ase_edge_set(atoms, r_max)
    positions, cell = graph[K.POSITIONS_KEY], graph[K.CELL_KEY][0]
    i, j = graph[K.EDGE_INDEX_KEY]
    lengths = (positions[j] - positions[i] + graph[K.EDGE_CELL_SHIFT_KEY] @ cell).norm(dim=1)
    assert 0 < lengths.min() and lengths.max() <= r_max


def test_types_labels_and_dtype(tio2_cell):
    graph = atoms_to_graph(tio2_cell, ["Ti", "O"], 4.0)
    n = len(tio2_cell)
    np.testing.assert_array_equal(graph[K.ATOM_TYPE_KEY].numpy(), (tio2_cell.numbers == 8).astype(int))
    assert graph[K.TOTAL_ENERGY_KEY].shape == (1, 1) and graph[K.FORCE_KEY].shape == (n, 3)
    assert graph[K.TOTAL_ENERGY_KEY].item() == tio2_cell.get_potential_energy()
    np.testing.assert_array_equal(graph[K.FORCE_KEY].numpy(), tio2_cell.get_forces())
    assert graph[K.POSITIONS_KEY].dtype == torch.get_default_dtype() == torch.float64

    small = atoms_to_graph(tio2_cell, ["Ti", "O"], 4.0, dtype=torch.float32, with_labels=False)
    assert K.TOTAL_ENERGY_KEY not in small and K.FORCE_KEY not in small
    assert all(small[k].dtype == torch.float32 for k in (K.POSITIONS_KEY, K.CELL_KEY, K.EDGE_CELL_SHIFT_KEY))
    assert torch.equal(small[K.EDGE_INDEX_KEY], graph[K.EDGE_INDEX_KEY])


def test_stress_label():
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.calc = SinglePointCalculator(atoms, energy=-3.0, forces=np.zeros((1, 3)), stress=np.arange(6.0))
    stress = atoms_to_graph(atoms, ["Cu"], 4.0)[K.STRESS_KEY]
    assert stress.shape == (1, 3, 3)
    np.testing.assert_array_equal(stress[0].numpy(), [[0, 5, 4], [5, 1, 3], [4, 3, 2]])


def test_unknown_element_raises(tio2_cell):
    with pytest.raises(DataError, match=r"element\(s\) \['Ti'\] not in type_names \['O'\]"):
        atoms_to_graph(tio2_cell, ["O"], 4.0)


def test_collate_batches(tio2_path):
    frames = ase.io.read(tio2_path, ":3")
    graphs = [atoms_to_graph(a, ["O", "Ti"], 4.0) for a in frames]
    batch = collate(graphs)
    assert batch[K.NUM_NODES_KEY].tolist() == [len(a) for a in frames]
    assert batch[K.TOTAL_ENERGY_KEY].shape == (3, 1)
    second = graphs[1][K.EDGE_INDEX_KEY] + len(frames[0])
    start = graphs[0][K.EDGE_INDEX_KEY].shape[1]
    assert torch.equal(batch[K.EDGE_INDEX_KEY][:, start : start + second.shape[1]], second)
