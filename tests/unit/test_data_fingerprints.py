"""Structure fingerprints: a moved, rotated, re-ordered or rattled copy is found; other geometries are not."""

import ase.io
import numpy as np
from ase.build import molecule
from conftest import BUNDLED_ETHANOL_TEST, BUNDLED_ETHANOL_TRAIN

from mlip_uq.data.fingerprints import NEAR_COPY_A, near_copies, nearest_distances


def test_a_copy_is_found_whatever_its_orientation_order_or_a_small_rattle():
    ethanol = molecule("CH3CH2OH")
    copy = ethanol[np.random.default_rng(0).permutation(len(ethanol))]
    copy.rotate(73, "z")
    copy.rotate(21, "x")
    copy.translate([5.0, -2.0, 1.0])
    rattled = ethanol.copy()
    rattled.rattle(0.003, seed=1)
    bent = ethanol.copy()
    bent.set_distance(0, 1, 1.9, fix=0)  # a different geometry
    water = molecule("H2O")
    distances = nearest_distances([copy, rattled, bent, water], [ethanol])
    assert distances[0] < 1e-10
    assert 0 < distances[1] < NEAR_COPY_A
    assert distances[2] > 0.05 and distances[3] == np.inf  # another composition is never a copy
    assert near_copies([copy, rattled, bent, water], [ethanol]) == [0, 1]


def test_the_bundled_ethanol_test_set_shares_no_frame_with_its_training_set():
    train = ase.io.read(BUNDLED_ETHANOL_TRAIN, ":")
    test = ase.io.read(BUNDLED_ETHANOL_TEST, ":")
    assert near_copies(test, train) == []
    assert near_copies(test[:5], train + test[:5]) == [0, 1, 2, 3, 4]
