"""Explorers: pool predictions equal the calculator's, walkers restart reproducibly, round robin."""

import numpy as np
import pytest
from ase.build import molecule
from conftest import seeded_posterior, tiny_model_config

from mlip_uq import UQCalculator
from mlip_uq.active.explore import Walker, next_walker, pool_uncertainty
from mlip_uq.data import atoms_to_graph


@pytest.fixture(scope="module")
def posterior():
    # float64: the pool's batched predictions are compared with the calculator's at 1e-10
    return seeded_posterior(tiny_model_config(["H", "C", "O"], dtype="float64"), method="ensemble")


def test_pool_uncertainty_matches_the_calculator_in_batches(posterior):
    structures = [molecule(name) for name in ("CH3CH2OH", "H2O", "CH4", "CH3OH", "HCOOH")]
    for i, atoms in enumerate(structures):
        atoms.rattle(0.05, seed=i)
    graphs = [atoms_to_graph(a, posterior.config.type_names, posterior.config.r_max) for a in structures]
    forces, stds, epistemic = pool_uncertainty(posterior, graphs, batch_size=2)
    assert [len(f) for f in forces] == [len(a) for a in structures]
    calc = UQCalculator(posterior)
    for atoms, f, s, e in zip(structures, forces, stds, epistemic):
        atoms.calc = calc
        np.testing.assert_allclose(f, atoms.get_forces(), atol=1e-10)
        np.testing.assert_allclose(s, calc.get_property("atom_force_std", atoms), atol=1e-10)
        np.testing.assert_allclose(e, calc.get_property("atom_force_std_epistemic", atoms), atol=1e-10)
        assert (s > 0).all() and (e < s).all()
    # a recalibrated posterior scales both alike
    scaled = posterior.with_calibration({"forces": 2.0})
    _, stds2, epistemic2 = pool_uncertainty(scaled, graphs[:1])
    np.testing.assert_allclose(stds2[0], 2.0 * stds[0], rtol=1e-12)
    np.testing.assert_allclose(epistemic2[0], 2.0 * epistemic[0], rtol=1e-12)


def test_walker_restarts_are_reproducible_and_at_temperature():
    atoms = molecule("CH3CH2OH")
    first = Walker.new(0, atoms, temperature_K=500.0, seed=3)
    again = Walker.new(0, atoms, temperature_K=500.0, seed=3)
    assert first.atoms == again.atoms and first.current().get_momenta().any()
    assert np.allclose(first.current().get_momenta().sum(axis=0), 0.0)  # no centre-of-mass drift
    momenta = first.current().get_momenta()
    first.restarts += 1
    first.reset(500.0, seed=3)
    assert not np.allclose(first.current().get_momenta(), momenta)  # a restart draws new velocities
    np.testing.assert_array_equal(first.current().positions, atoms.positions)
    assert first.chunk_seed(3) == again.chunk_seed(3)
    again.chunks += 1
    assert first.chunk_seed(3) != again.chunk_seed(3)


def test_next_walker_goes_round_robin_and_skips_finished_ones():
    atoms = molecule("H2O")
    walkers = [Walker.new(i, atoms, 300.0, 0) for i in range(3)]
    assert next_walker(walkers, -1).index == 0 and next_walker(walkers, 0).index == 1
    assert next_walker(walkers, 2).index == 0
    walkers[0].done = walkers[1].done = True
    assert next_walker(walkers, 2).index == 2
    walkers[2].done = True
    assert next_walker(walkers, 0) is None
