"""The calculator's result keys are defined once (mlip_uq.result_keys): every constant is in exactly one group, and
the calculator advertises and writes exactly those keys, so that a key cannot be added in one place only."""

import numpy as np
from conftest import seeded_posterior, tiny_model_config

import mlip_uq.result_keys as keys
from mlip_uq import UQCalculator, uq_to_atoms
from mlip_uq.testing import contract_atoms


def _constants():
    """The module's single keys: upper-case names bound to a string."""
    return {name: value for name, value in vars(keys).items() if name.isupper() and isinstance(value, str)}


def test_every_key_constant_is_in_exactly_one_group():
    groups = keys.ASE_PROPERTIES + keys.UNCERTAINTY_PROPERTIES + keys.SAMPLE_PROPERTIES
    assert keys.ALL_PROPERTIES == groups
    assert len(set(groups)) == len(groups)
    assert set(_constants().values()) == set(groups)
    assert all(name.lower() == value for name, value in _constants().items())  # ENERGY_STD = "energy_std"
    assert keys.FORCE_UNCERTAINTY_PROPERTIES <= set(keys.UNCERTAINTY_PROPERTIES + keys.SAMPLE_PROPERTIES)
    copied = keys.INFO_KEYS + keys.ARRAY_KEYS + (keys.FORCES_SAMPLES,)  # uq_to_atoms copies every uncertainty
    assert sorted(copied) == sorted(keys.UNCERTAINTY_PROPERTIES + keys.SAMPLE_PROPERTIES)


def test_the_calculator_advertises_and_writes_exactly_the_constants():
    assert UQCalculator.implemented_properties == list(keys.ASE_PROPERTIES + keys.UNCERTAINTY_PROPERTIES)
    config = tiny_model_config(["O", "Ti"], dtype="float64")
    atoms = contract_atoms(config.type_names)  # periodic: stress and stress_std are written too
    atoms.calc = UQCalculator(seeded_posterior(config, (0, 1)), return_samples=True)
    assert atoms.calc.implemented_properties == list(keys.ALL_PROPERTIES)
    atoms.calc.get_property(keys.ATOM_FORCE_STD, atoms)  # with it every other key
    assert set(atoms.calc.results) == set(keys.ALL_PROPERTIES)
    uq_to_atoms(atoms, compute_missing=False)
    assert set(keys.INFO_KEYS) <= set(atoms.info) and set(keys.ARRAY_KEYS) <= set(atoms.arrays)
    assert atoms.arrays[keys.FORCES_SAMPLES].shape == (len(atoms), 3 * 2)
    assert np.isfinite(atoms.info[keys.ENERGY_STD])
