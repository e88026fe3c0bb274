"""Divergence checks and the replica MD runs of mlip_uq.stability."""

import numpy as np
import pytest
from ase.build import molecule
from conftest import seeded_posterior, tiny_model_config

from mlip_uq import UQCalculator
from mlip_uq.stability import bond_fragments, stability_runs, unphysical


def test_unphysical_finds_close_contacts_broken_bonds_and_nan():
    ethanol = molecule("CH3CH2OH")
    n = bond_fragments(ethanol)
    assert n == 1 and not unphysical(ethanol, n)
    split = ethanol.copy()
    split.positions[split.numbers == 8] += [4.0, 0.0, 0.0]  # the O atom torn off (with nothing bonded to it)
    assert bond_fragments(split) > 1 and unphysical(split, n)
    squeezed = ethanol.copy()
    squeezed.set_distance(0, 1, 0.5, fix=0)
    assert unphysical(squeezed, n)
    broken = ethanol.copy()
    broken.positions[0, 0] = np.nan
    assert unphysical(broken, n)


@pytest.fixture(scope="module")
def calculator():
    return UQCalculator(seeded_posterior(tiny_model_config(["H", "C", "O"], dtype="float32"), method="ensemble"))


def test_replicas_of_an_untrained_model_break_and_are_counted(calculator):
    # an untrained model's forces tear the molecule apart within 100 fs at 600 K
    result = stability_runs(calculator, molecule("CH3CH2OH"), 600.0, n_runs=4, steps=200, check_every=50)
    assert result.physical == 0 and set(result.failed_at) == {0, 1, 2, 3}
    assert all(step % 50 == 0 and 0 < step <= 200 for step in result.failed_at.values())
    record = result.to_dict()
    assert record["n_runs"] == 4 and record["physical"] == 0 and record["time_ps"] == pytest.approx(0.1)


def test_short_cold_runs_stay_physical_and_every_run_is_checked(calculator):
    # 2 fs near 0 K: the atoms barely move, whatever the forces
    result = stability_runs(calculator, molecule("CH3CH2OH"), 1.0, n_runs=3, steps=20, timestep_fs=0.1,
                            check_every=10)
    assert result.physical == 3 and result.failed_at == {} and result.errors == []
    with pytest.raises(ValueError, match="molecule"):
        periodic = molecule("CH3CH2OH")
        periodic.cell, periodic.pbc = [10, 10, 10], True
        stability_runs(calculator, periodic, 300.0)
