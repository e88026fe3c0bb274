"""Recalibration of predictive stds: scalar NLL factor, isotonic map, posterior file, calculator and evaluate."""

import ase.io
import h5py
import numpy as np
import pytest
from conftest import seeded_posterior, tiny_model_config

from mlip_uq import UQCalculator
from mlip_uq.evaluate import calibrate_file, evaluate_file
from mlip_uq.model import build_model
from mlip_uq.posterior import Posterior, load_posterior
from mlip_uq.posterior.io import write_calibration
from mlip_uq.uq.calibration import (
    calibrated_std,
    check_calibration,
    describe,
    fit_calibration,
    fit_isotonic,
    std_ratio,
)
from mlip_uq.uq.metrics import gaussian_nll

CONFIG = tiny_model_config(["O", "Ti"], r_max=4.0, avg_num_neighbors=20.0,
                           energy_shifts={"O": -432.503149303, "Ti": -1604.604515075})


def posterior(**kw):
    return seeded_posterior(CONFIG, energy_references=dict(CONFIG.energy_shifts), **kw)


def synthetic(n=4000, seed=0):
    """Errors whose true std is 3σ for σ < 1 and 1.5σ above: over-confident, and not by one factor."""
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.1, 2.0, n)
    true = np.where(std < 1.0, 3.0 * std, 1.5 * std)
    return rng.normal(0.0, true), std, true


def test_scalar_factor_is_the_closed_form_nll_minimum():
    err, std, _ = synthetic()
    cal = fit_calibration(err[:50], std[:50], err.reshape(-1, 2)[:, :1].repeat(3, 1), std.reshape(-1, 2)[:, :1].repeat(3, 1))
    s = cal["energy"]
    assert s == pytest.approx(np.sqrt(np.mean((err[:50] / std[:50]) ** 2)), rel=1e-12)
    nll = [gaussian_nll(err[:50], f * std[:50]) for f in (0.98 * s, s, 1.02 * s)]
    assert nll[1] < nll[0] and nll[1] < nll[2]
    assert describe(cal).startswith("energy std x")


def test_calibrated_std_scales_by_exactly_the_factor():
    std = np.array([[0.0, 0.1, 0.2], [0.3, 1.0, 5.0]])
    cal = {"energy": 1.7, "forces": 0.6}
    np.testing.assert_array_equal(calibrated_std(cal, "forces", std), 0.6 * std)
    np.testing.assert_array_equal(calibrated_std({}, "forces", std), std)
    assert calibrated_std(cal, "energy", None) is None


def test_isotonic_map_is_strictly_increasing_and_better_than_one_factor():
    err, std, true = synthetic()
    iso = fit_isotonic(err, std)
    assert np.all(np.diff(iso["std"]) > 0) and np.all(np.diff(iso["calibrated_std"]) > 0)
    test_err, test_std, test_true = synthetic(seed=1)
    scale = fit_calibration(None, None, err, std)["forces"]
    iso_cal = {"isotonic": {"forces": iso}}
    nll_raw = gaussian_nll(test_err, test_std)
    nll_scale = gaussian_nll(test_err, scale * test_std)
    nll_iso = gaussian_nll(test_err, calibrated_std(iso_cal, "forces", test_std))
    assert nll_iso < nll_scale < nll_raw
    # the fitted map recovers the true std away from the jump at σ = 1
    for s in (0.5, 1.5):
        near = np.abs(test_std - s) < 0.05
        assert np.median(calibrated_std(iso_cal, "forces", test_std[near]) / test_true[near]) == pytest.approx(1, abs=0.15)


@pytest.mark.parametrize("isotonic", [False, True])
def test_recalibration_keeps_the_order_of_distinct_stds_strictly(isotonic):
    err, std, _ = synthetic()
    cal = fit_calibration(None, None, err, std, isotonic=isotonic)
    test_std = np.sort(synthetic(seed=2)[1])
    test_std = np.concatenate([[test_std[0] / 10], test_std, [test_std[-1] * 10]])  # beyond the fitted range too
    out = calibrated_std(cal, "forces", test_std)
    distinct = np.diff(test_std) > 0
    assert np.all(np.diff(out)[distinct] > 0)
    assert len(np.unique(out)) == len(np.unique(test_std))


def test_isotonic_map_is_linear_between_knots_proportional_outside_and_keeps_zero():
    cal = {"isotonic": {"energy": {"std": np.array([1.0, 2.0]), "calibrated_std": np.array([3.0, 5.0])}}}
    std = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 8.0])
    np.testing.assert_allclose(calibrated_std(cal, "energy", std), [0.0, 1.5, 3.0, 4.0, 5.0, 20.0])
    np.testing.assert_allclose(std_ratio(cal, "energy", std), [1.0, 3.0, 3.0, 4.0 / 1.5, 2.5, 2.5])
    # ties in σ get one value (the mean of e² over the tie); a decrease is pooled into one block, whose knot is
    # at its count-weighted mean σ
    iso = fit_isotonic([1.0, -3.0, 3.0], [0.5, 0.5, 1.0], min_count=1)
    np.testing.assert_allclose(iso["std"], [0.5, 1.0])
    np.testing.assert_allclose(iso["calibrated_std"], [np.sqrt(5.0), 3.0])
    iso = fit_isotonic([1.0, -3.0, 2.0], [0.5, 0.5, 1.0], min_count=1)
    np.testing.assert_allclose(iso["std"], [2.0 / 3.0])
    np.testing.assert_allclose(iso["calibrated_std"], [np.sqrt(14.0 / 3.0)])
    # one block is one factor
    one = {"isotonic": {"forces": iso}}
    np.testing.assert_allclose(std_ratio(one, "forces", [0.1, 1.0, 5.0]), [np.sqrt(14.0 / 3.0) * 1.5] * 3)


def test_isotonic_blocks_hold_enough_errors_to_estimate_their_variance():
    """Calibrated stds (errors drawn with the predicted std): every knot of the map stays near a factor 1, and no
    block of a few small errors by chance sends its stds towards zero."""
    rng = np.random.default_rng(0)
    std = rng.uniform(0.1, 0.2, 4000)
    err = rng.normal(0.0, std)

    def ratio(iso):
        return iso["calibrated_std"] / iso["std"]

    assert ratio(fit_isotonic(err, std, min_count=1)).min() < 0.6  # the unmerged fit: the failure
    iso = fit_isotonic(err, std)
    assert np.all(np.abs(ratio(iso) - 1.0) < 0.2)
    assert np.all(np.diff(iso["std"]) > 0) and np.all(np.diff(iso["calibrated_std"]) > 0)
    # fewer errors than one block needs: one block, one factor
    assert len(fit_isotonic(err[:49], std[:49])["std"]) == 1
    with pytest.raises(ValueError, match="min_count"):
        fit_isotonic(err, std, min_count=0)


@pytest.mark.parametrize("isotonic", [False, True])
def test_force_components_zero_by_symmetry_are_left_out_of_the_fit(isotonic):
    """Components with a zero error (round-off of a force zero by symmetry) at the smallest stds, as in a
    symmetric crystal cell: the fit is the one without them, and no calibrated std collapses towards zero."""
    rng = np.random.default_rng(0)
    std = rng.uniform(0.1, 0.2, 3000)
    err = rng.normal(0.0, std)
    zeros = np.argsort(std)[:300]
    with_zeros = err.copy()
    with_zeros[zeros] = rng.normal(0.0, 1e-6, zeros.size)
    keep = np.ones(std.size, dtype=bool)
    keep[zeros] = False
    fitted = fit_calibration(None, None, with_zeros, std, isotonic=isotonic)
    expected = fit_calibration(None, None, err[keep], std[keep], isotonic=isotonic)
    if isotonic:
        for k in ("std", "calibrated_std"):
            np.testing.assert_array_equal(fitted["isotonic"]["forces"][k], expected["isotonic"]["forces"][k])
        assert calibrated_std(fitted, "forces", std).min() > 0.8 * std.min()
    else:
        assert fitted["forces"] == expected["forces"]


def test_bad_calibrations_are_rejected():
    with pytest.raises(ValueError, match="unknown calibration quantity"):
        check_calibration({"stress": 2.0})
    with pytest.raises(ValueError, match="both a factor and an isotonic map"):
        check_calibration({"forces": 2.0, "isotonic": {"forces": {"std": [1.0], "calibrated_std": [1.0]}}})
    with pytest.raises(ValueError, match="finite and > 0"):
        check_calibration({"energy": -1.0})
    with pytest.raises(ValueError, match="increasing positive knots"):
        check_calibration({"isotonic": {"forces": {"std": [2.0, 1.0], "calibrated_std": [1.0, 1.0]}}})
    with pytest.raises(ValueError, match="finite errors"):
        fit_isotonic([1.0], [np.nan])
    with pytest.raises(ValueError, match="forces: no validation item"):
        fit_calibration(None, None, np.zeros((5, 3)), np.ones((5, 3)))  # every force zero by symmetry


@pytest.mark.parametrize("isotonic", [False, True])
def test_calibration_round_trips_through_the_file_and_keeps_other_groups(tmp_path, isotonic):
    path = tmp_path / "p.h5"
    posterior().save(path)
    with h5py.File(path, "a") as f:  # a group this reader does not know (e.g. another method's)
        f.create_dataset("vi/mean/x", data=np.arange(3.0))
    err, std, _ = synthetic(300)
    cal = fit_calibration(err[:100], std[:100], err, std, isotonic=isotonic)
    write_calibration(path, cal)
    loaded = load_posterior(path).calibration
    if isotonic:
        for q in ("energy", "forces"):
            for k in ("std", "calibrated_std"):
                np.testing.assert_array_equal(loaded["isotonic"][q][k], cal["isotonic"][q][k])
    else:
        assert loaded == cal
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["vi/mean/x"][()], np.arange(3.0))
    write_calibration(path, {})  # removed again
    assert load_posterior(path).calibration == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5"]


def test_calculator_std_scales_by_exactly_the_posterior_factor(tio2_path):
    atoms = ase.io.read(tio2_path, 0)
    raw, cal = atoms.copy(), atoms.copy()
    raw.calc = UQCalculator(posterior())
    cal.calc = UQCalculator(posterior(calibration={"energy": 2.5, "forces": 0.4}))
    assert cal.calc.calibration == "energy std x2.5, forces std x0.4"
    assert cal.get_potential_energy() == raw.get_potential_energy()
    for key, factor in (("energy_std", 2.5), ("energy_std_epistemic", 2.5), ("energies_std", 2.5),
                        ("forces_std", 0.4), ("forces_std_epistemic", 0.4), ("atom_force_std", 0.4),
                        ("atom_force_std_epistemic", 0.4)):
        np.testing.assert_allclose(cal.calc.get_property(key, cal), factor * raw.calc.get_property(key, raw),
                                   rtol=1e-14, err_msg=key)
    np.testing.assert_array_equal(cal.calc.get_property("stress_std", cal), raw.calc.get_property("stress_std", raw))


def test_calibrate_command_fits_writes_and_evaluate_reports_before_and_after(tio2_path, tmp_path):
    frames = ase.io.read(tio2_path, ":12")
    ase.io.write(tmp_path / "val.extxyz", frames[:8])
    ase.io.write(tmp_path / "test.extxyz", frames[8:])
    post = posterior()
    post.save(tmp_path / "p.h5")
    report = calibrate_file(tmp_path / "p.h5", tmp_path / "val.extxyz", out=tmp_path / "cal.json")
    cal = load_posterior(tmp_path / "p.h5").calibration
    assert set(cal) == {"energy", "forces"} and report["calibration"] == describe(cal)
    # an untrained model is far over-confident: the factor is large and the NLL falls
    assert cal["forces"] > 1 and report["after"]["forces_nll"] < report["before"]["forces_nll"]
    assert report["after"]["forces_sharpness"] == pytest.approx(cal["forces"] * report["before"]["forces_sharpness"])
    assert report["after"]["forces_mae"] == report["before"]["forces_mae"]
    metrics = evaluate_file(tmp_path / "p.h5", tmp_path / "test.extxyz")
    assert metrics["calibration"] == describe(cal)
    assert metrics["forces_sharpness"] == pytest.approx(cal["forces"] * metrics["uncalibrated"]["forces_sharpness"])
    assert metrics["forces_mae"] == metrics["uncalibrated"]["forces_mae"]
    single = Posterior.from_state_dicts(CONFIG, [build_model(CONFIG).state_dict()])
    single.save(tmp_path / "one.h5")  # one model: its stds are its noise, which calibrate too
    assert calibrate_file(tmp_path / "one.h5", tmp_path / "val.extxyz")["after"]["forces_sharpness"] > 0
