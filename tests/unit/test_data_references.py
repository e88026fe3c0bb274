"""Energy references: exact recovery, minimum-norm fallback, TiO2 ranges and outlier filter counts."""

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import full_data_set

from mlip_uq.data import DataError, filter_frames, fit_energy_references, referenced_energy_per_atom

AENET_TIO2 = {"O": -432.503149303, "Ti": -1604.604515075}


def _frame(symbols: str, energy: float, forces=None) -> ase.Atoms:
    atoms = ase.Atoms(symbols)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def test_fit_recovers_exact_references():
    rng = np.random.default_rng(0)
    truth = {"H": -13.6, "C": -1029.5, "O": -2041.3}
    frames = []
    for _ in range(30):
        n = rng.integers(1, 12, size=3)
        symbols = "".join(f"{s}{k}" for s, k in zip(truth, n))
        frames.append(_frame(symbols, float(n @ np.array(list(truth.values())))))
    fitted = fit_energy_references(frames, ["H", "C", "O"])
    for name, value in truth.items():
        assert fitted[name] == pytest.approx(value, abs=1e-8)
    np.testing.assert_allclose(referenced_energy_per_atom(frames, fitted), 0.0, atol=1e-9)


def test_single_composition_gives_minimum_norm_solution():
    frames = [_frame("Ti2O4", -100.0), _frame("Ti4O8", -200.0)]  # one reduced composition: underdetermined
    fitted = fit_energy_references(frames, ["O", "Ti"])
    e = np.array([fitted["O"], fitted["Ti"]])
    np.testing.assert_allclose(e, np.linalg.pinv(np.array([[4.0, 2.0], [8.0, 4.0]])) @ [-100.0, -200.0])
    np.testing.assert_allclose(referenced_energy_per_atom(frames, fitted), 0.0, atol=1e-12)


def test_undetermined_direction_keeps_the_start_values():
    # stoichiometric TiO2 only: e_Ti + 2 e_O is fixed by the data, the split between them is not
    start = {"O": -432.5, "Ti": -1604.6}
    frames = [_frame("TiO2", -2475.0), _frame("Ti2O4", -4950.2)]
    refs = fit_energy_references(frames, ["O", "Ti"], start=start)
    assert refs["Ti"] + 2 * refs["O"] == pytest.approx((-2475.0 + 2 * -4950.2) / 5)  # least squares in E
    # the deviation from the start is along the data's direction (1 Ti, 2 O) only
    d = np.array([refs["O"] - start["O"], refs["Ti"] - start["Ti"]])
    assert d[0] == pytest.approx(2 * d[1])
    # determined fits do not depend on the start
    full = frames + [_frame("Ti2O3", -4507.0)]
    assert fit_energy_references(full, ["O", "Ti"], start=start) == pytest.approx(fit_energy_references(full, ["O", "Ti"]))


def test_missing_reference_or_energy_raises():
    with pytest.raises(DataError, match=r"frame 1: element 'C' not in \['H', 'O'\]"):
        referenced_energy_per_atom([_frame("H2O", -1.0), _frame("CO", -2.0)], {"H": 0.0, "O": 0.0})
    with pytest.raises(DataError, match="frame 0: no energy label"):
        fit_energy_references([ase.Atoms("H2")], ["H"])


def test_filter_frames_on_synthetic_thresholds():
    frames = [
        _frame("H2", -2.0, np.zeros((2, 3))),  # 0 eV/atom over references: kept
        _frame("H2", 4.0, np.zeros((2, 3))),  # +3 eV/atom: dropped by energy
        _frame("H2", -2.0, np.array([[0, 0, 50.0], [0, 0, -50.0]])),  # dropped by force
    ]
    kept, mask = filter_frames(frames, {"H": -1.0}, max_energy_per_atom=1.0, max_force=20.0)
    assert mask.tolist() == [True, False, False] and kept == frames[:1]
    assert filter_frames(frames, {"H": -1.0})[1].all()


def test_bundled_tio2_subset_referenced_energy_range_and_filter_count(tio2_path):
    """The bundled subset lies inside the filter of the full-set configurations: it drops none of it."""
    subset = ase.io.read(tio2_path, ":")
    energy = referenced_energy_per_atom(subset, AENET_TIO2)
    assert len(subset) == 1000 and -8.58 <= energy.min() < -8.5 and -7.01 < energy.max() <= -7.0
    kept, mask = filter_frames(subset, AENET_TIO2, max_energy_per_atom=-5.0, max_force=20.0)
    assert len(kept) == 1000 and mask.all()


@pytest.fixture(scope="module")
def tio2_full():
    """The full aenet TiO2 set (7,815 structures, not shipped): ``mlip-uq data fetch tio2_aenet``, else skipped."""
    return ase.io.read(full_data_set("tio2_aenet", "tio2_aenet_7815.extxyz", "tio2_aenet/tio2_aenet_7815.extxyz"), ":")


def test_tio2_referenced_energy_range_and_filter_count(tio2_full):
    assert len(tio2_full) == 7815
    energy = referenced_energy_per_atom(tio2_full, AENET_TIO2)
    assert -8.58 <= energy.min() < -8.5 and 21.8 < energy.max() <= 21.9
    kept, mask = filter_frames(tio2_full, AENET_TIO2, max_energy_per_atom=-5.0, max_force=20.0)
    assert len(tio2_full) - len(kept) == 304 == (~mask).sum()
