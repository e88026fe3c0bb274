"""Export to nequip packages (``mlip_uq.export``) and the offline committee screen (``mlip_uq.screen``).

Each exported sample, loaded by nequip's own ASE calculator, must give that sample's energy, forces and stress
(float64, 1e-6); the mean model, where exactness is claimed, the posterior mean; where it is not exact,
``mean="require"`` raises naming the tensors.
"""

import csv
import json
import os
import subprocess

import ase.io
import numpy as np
import pytest
import torch
from conftest import BUNDLED_TIO2, seeded_posterior, tiny_model_config, untrained_state_dict

from mlip_uq import UQCalculator
from mlip_uq.cli import main
from mlip_uq.export import PACKAGE_FORMAT_VERSION, export_posterior, load_package, mean_model_exactness, nequip_model
from mlip_uq.posterior import Posterior
from mlip_uq.screen import COLUMNS, screen_trajectory

READOUT = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"
SHIFTS = "model.func.per_type_energy_scale_shift.shifts"
SCALES = "model.func.per_type_energy_scale_shift.scales"
NOISE = "model.func.observation_noise.force_log_factor"


@pytest.fixture(scope="module")
def frame():
    """A 22-atom periodic TiO2 cell of the bundled subset (not the packages' example structure)."""
    atoms = next(a for a in ase.io.read(BUNDLED_TIO2, ":") if len(a) == 22)
    return ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)


def nequip_calculator(path):
    from nequip.integrations.ase import NequIPCalculator

    return NequIPCalculator._from_saved_model(str(path), device="cpu", chemical_species_to_atom_type_map=True)


def predict(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def assert_same(got, expected, rtol=1e-6):
    for g, e in zip(got, expected):
        scale = max(1.0, float(np.abs(e).max()))
        assert np.abs(np.asarray(g) - np.asarray(e)).max() <= rtol * scale


def readout_posterior(stochastic=(READOUT, SHIFTS, NOISE), k=3, dtype="float64", **config):
    """K samples sharing the trunk, differing in ``stochastic`` (unequal weights)."""
    cfg = tiny_model_config(["O", "Ti"], dtype=dtype, **config)
    base = untrained_state_dict(cfg, 0)
    generator = torch.Generator().manual_seed(1)
    states = []
    for _ in range(k):
        state = {n: t.clone() for n, t in base.items()}
        for name in stochastic:
            state[name] = state[name] + 0.3 * torch.randn(state[name].shape, generator=generator, dtype=state[name].dtype)
        states.append(state)
    return Posterior.from_state_dicts(cfg, states, stochastic=list(stochastic), method="sgmcmc",
                                      weights=torch.tensor([0.5, 0.3, 0.2][:k]), calibration={"forces": 1.7})


def test_package_format_is_nequips():
    from nequip.scripts.package import _CURRENT_NEQUIP_PACKAGE_VERSION

    assert PACKAGE_FORMAT_VERSION == _CURRENT_NEQUIP_PACKAGE_VERSION


def test_every_sample_loaded_by_nequips_calculator_gives_that_sample(tmp_path, frame):
    post = seeded_posterior(tiny_model_config(["O", "Ti"], dtype="float64"), calibration={"forces": 1.5})
    manifest = export_posterior(post, tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["type_names"] == ["O", "Ti"] and manifest["r_max"] == post.config.r_max
    assert manifest["dtype"] == "float64" and manifest["calibration"] == {"forces": 1.5}
    assert manifest["weights"] == pytest.approx(post.weights.tolist())
    for k, entry in enumerate(manifest["samples"]):
        one = post.replace(samples={n: t[k : k + 1] for n, t in post.samples.items()})
        got = predict(nequip_calculator(tmp_path / entry["file"]), frame)
        expected = predict(UQCalculator(one, dtype="float64"), frame)
        assert_same(got, expected)
        assert max(entry["verified"].values()) <= 1e-6
        assert set(entry["noise"]["force_std"]) == {"O", "Ti"}
    # the trunk is sampled: no exact mean model, and the manifest says why
    mean = manifest["mean_model"]
    assert mean["file"] is None and not mean["exact"] and "type_embed" in mean["why"]
    assert not (tmp_path / "mean.nequip.zip").exists()


def test_mean_model_of_a_sampled_linear_readout_is_the_posterior_mean(tmp_path, frame):
    post = readout_posterior()
    exact, why = mean_model_exactness(post)
    assert exact, why
    manifest = export_posterior(post, tmp_path, mean="require")
    assert manifest["mean_model"]["file"] == "mean.nequip.zip" and manifest["stochastic_tensors"] == [READOUT, SHIFTS]
    got = predict(nequip_calculator(tmp_path / "mean.nequip.zip"), frame)
    expected = predict(UQCalculator(post, dtype="float64"), frame)
    assert_same(got, expected)
    # and not any one sample's: the samples differ
    first = predict(nequip_calculator(tmp_path / "sample_000.nequip.zip"), frame)
    assert abs(first[0] - expected[0]) > 1e-3


HIDDEN_LAST = "model.func.per_atom_energy_readout.mlp_module.mlp.2.weight"


@pytest.mark.parametrize("stochastic,config,words", [
    ((READOUT, SCALES), {}, "their product is not linear"),
    ((READOUT,), {"readout_hidden_width": 4}, "hidden layer"),
    (("model.func.layer0_convnet.conv.linear_2.weight", NOISE), {}, "not linear in the sampled tensors"),
])
def test_mean_model_not_exact_is_refused_when_required(tmp_path, stochastic, config, words):
    post = readout_posterior(stochastic=stochastic, **config)
    exact, why = mean_model_exactness(post)
    assert not exact and words in why
    with pytest.raises(ValueError, match="cannot be exported exactly.*" + words):
        export_posterior(post, tmp_path, mean="require")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before anything is written


def test_exact_means_beyond_the_linear_readout(tmp_path, frame):
    assert mean_model_exactness(seeded_posterior(tiny_model_config(["O", "Ti"]), seeds=(0,)))[0]  # one sample
    assert mean_model_exactness(readout_posterior(stochastic=(SCALES, SHIFTS)))[0]
    # a hidden readout layer, only its last linear layer sampled: linear in it
    post = readout_posterior(stochastic=(HIDDEN_LAST,), readout_hidden_width=4)
    assert mean_model_exactness(post)[0]
    export_posterior(post, tmp_path, mean="require")
    got = predict(nequip_calculator(tmp_path / "mean.nequip.zip"), frame)
    assert_same(got, predict(UQCalculator(post, dtype="float64"), frame))


def test_float32_export_is_checked(tmp_path, frame):
    post = readout_posterior(dtype="float32")
    manifest = export_posterior(post, tmp_path)
    assert manifest["dtype"] == "float32" and manifest["mean_model"]["file"]
    model = load_package(tmp_path / "sample_001.nequip.zip")
    assert model.model_dtype == torch.float32
    got = predict(nequip_calculator(tmp_path / "sample_001.nequip.zip"), frame)
    one = post.replace(samples={n: t[1:2] for n, t in post.samples.items()})
    assert_same(got, predict(UQCalculator(one), frame), rtol=1e-4)


def test_a_model_that_is_not_nequip_plus_noise_is_refused():
    cfg = tiny_model_config(["O", "Ti"])
    state = untrained_state_dict(cfg, 0)
    state["model.func.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="not a plain nequip NequIPGNNModel.*extra.weight"):
        nequip_model(cfg, state)


def test_export_cli(tmp_path, capsys):
    post = readout_posterior()
    post.save(tmp_path / "posterior.h5")
    assert main(["export", str(tmp_path / "posterior.h5"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "3 sample(s)" in out and "mean.nequip.zip (exact" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "mean.nequip.zip", "sample_000.nequip.zip", "sample_001.nequip.zip", "sample_002.nequip.zip"]
    full = seeded_posterior(tiny_model_config(["O", "Ti"]))
    full.save(tmp_path / "full.h5")
    assert main(["export", str(tmp_path / "full.h5"), "--out", str(tmp_path / "o2"), "--mean", "require"]) == 2
    assert "cannot be exported exactly" in capsys.readouterr().err


def test_screen_gives_the_calculators_per_frame_max(tmp_path):
    post = seeded_posterior(tiny_model_config(["O", "Ti"], dtype="float64"))
    frames = [a for a in ase.io.read(BUNDLED_TIO2, ":40") if len(a) < 30][:4]
    ase.io.write(tmp_path / "traj.extxyz", frames)
    rows = screen_trajectory(post, tmp_path / "traj.extxyz", out=tmp_path / "per_frame.csv")
    assert len(rows) == len(frames)
    for row, atoms in zip(rows, frames):
        atoms = atoms.copy()
        atoms.calc = UQCalculator(post)
        std = atoms.calc.get_property("atom_force_std", atoms)
        assert row["max_atom_force_std"] == pytest.approx(std.max(), rel=1e-10)
        assert row["max_atom_force_std_epistemic"] == pytest.approx(
            atoms.calc.get_property("atom_force_std_epistemic", atoms).max(), rel=1e-10)
        assert row["argmax_atom"] == int(std.argmax())
    with open(tmp_path / "per_frame.csv") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(COLUMNS) and len(table) == len(frames)
    assert float(table[2]["max_atom_force_std"]) == pytest.approx(rows[2]["max_atom_force_std"])
    post.save(tmp_path / "posterior.h5")
    assert main(["screen", str(tmp_path / "posterior.h5"), str(tmp_path / "traj.extxyz"), "--threshold", "0"]) == 0
    with pytest.raises(FileNotFoundError):
        screen_trajectory(post, tmp_path / "missing.extxyz")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MLIP_UQ_TEST_COMPILE"), reason="nequip-compile (AOTInductor) takes about a "
                    "minute per model on 2 CPU cores; set MLIP_UQ_TEST_COMPILE=1 to run it")
def test_an_exported_sample_compiles_with_nequip_compile(tmp_path, frame):
    from nequip.integrations.ase import NequIPCalculator

    post = seeded_posterior(tiny_model_config(["O", "Ti"], dtype="float64"))
    export_posterior(post, tmp_path, mean="none")
    compiled = tmp_path / "sample_001.nequip.pt2"
    subprocess.run(["nequip-compile", str(tmp_path / "sample_001.nequip.zip"), str(compiled), "--mode", "aotinductor",
                    "--device", "cpu", "--target", "ase"], check=True, capture_output=True)
    calc = NequIPCalculator.from_compiled_model(str(compiled), device="cpu", chemical_species_to_atom_type_map=True)
    one = post.replace(samples={n: t[1:2] for n, t in post.samples.items()})
    assert_same(predict(calc, frame)[:2], predict(UQCalculator(one, dtype="float64"), frame)[:2])


def test_noise_head_and_dropout_architectures_export_exactly(tmp_path, frame):
    """The noise head and the dropout wrappers do not touch the energy: the plain nequip model is the sample."""
    config = tiny_model_config(["O", "Ti"], dtype="float64", noise="head", dropout=0.2, readout_hidden_width=4)
    post = seeded_posterior(config, seeds=(0, 1))
    manifest = export_posterior(post, tmp_path)
    assert manifest["samples"][1]["noise"]["heteroscedastic_head"]
    one = post.replace(samples={n: t[1:2] for n, t in post.samples.items()})
    assert_same(predict(nequip_calculator(tmp_path / "sample_001.nequip.zip"), frame),
                predict(UQCalculator(one, dtype="float64"), frame))
