"""UQCalculator: ASE contract, finite differences, sample statistics, trunk/tail evaluation, neighbour-list reuse,
extxyz round trip and bad inputs (float64 throughout, tiny untrained models)."""

import ase.io
import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from conftest import untrained_state_dict
from nequip.data import AtomicDataDict

import mlip_uq.calculator as calculator_module
from mlip_uq import UQCalculator, uq_to_atoms
from mlip_uq.calculator import FORCE_UNCERTAINTY_PROPERTIES
from mlip_uq.data import atoms_to_graph, collate
from mlip_uq.inference.priors import select_stochastic
from mlip_uq.model import ModelConfig, build_model
from mlip_uq.posterior import Posterior
from mlip_uq.posterior.predict import SamplePass, predict_samples, split_model

# float64: the checks below compare against finite differences and other code paths at tight tolerances

CONFIG = ModelConfig(type_names=["O", "Ti"], r_max=4.0, num_layers=2, num_features=8, radial_mlp_width=16,
                     avg_num_neighbors=20.0, energy_shifts={"O": -4.0, "Ti": -8.0}, dtype="float64")

def state_dicts(seeds, config=CONFIG):
    return [untrained_state_dict(config, s) for s in seeds]


def full_posterior(seeds=(0, 1, 2, 3), config=CONFIG, **kw):
    return Posterior.from_state_dicts(config, state_dicts(seeds, config), **kw)


def partial_posterior(k=4, config=CONFIG):
    """Only the readout differs between samples (as a partially Bayesian SG-MCMC run leaves it)."""
    sds = state_dicts(range(k), config)
    heads = select_stochastic(build_model(config), {"last_layers": 1})
    samples = [dict(sds[0], **{n: sd[n] for n in heads}) for sd in sds]
    return Posterior.from_state_dicts(config, samples, stochastic=heads)


@pytest.fixture(scope="module")
def tio2(tio2_path):
    atoms = ase.io.read(tio2_path, 0)
    atoms.calc = None
    atoms.rattle(0.05, seed=1)
    return atoms


def reference_loop(post, atoms):
    """Each sample through the whole nequip model (its own ForceStressOutput), one after another."""
    model = post.model()
    graph = collate([atoms_to_graph(atoms, CONFIG.type_names, CONFIG.r_max, with_labels=False)])
    e, f, s = [], [], []
    for k in range(post.n_samples):
        out = torch.func.functional_call(model, post.sample_parameters(k), (dict(graph),), strict=False)
        e.append(out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().view(-1))
        f.append(out[AtomicDataDict.FORCE_KEY].detach())
        s.append(out[AtomicDataDict.STRESS_KEY].detach().view(-1, 3, 3))
    return graph, torch.stack(e), torch.stack(f), torch.stack(s)


@pytest.mark.parametrize("kind", ["partial", "full"])
@pytest.mark.parametrize("batched", [False, True])
def test_trunk_once_equals_the_per_sample_loop(tio2, kind, batched):
    post = partial_posterior() if kind == "partial" else full_posterior()
    graph, energy, forces, stress = reference_loop(post, tio2)
    pred = predict_samples(post, graph, batched=batched)
    torch.testing.assert_close(pred.energy, energy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.forces, forces, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.stress, stress, rtol=1e-10, atol=1e-12)
    split = split_model(post)
    if kind == "partial":  # the whole network up to the readout runs once
        assert {"type_embed", "layer0_convnet", "layer1_convnet"} <= set(split.trunk)
        assert split.tail_names[0] == "per_atom_energy_readout"
    else:  # the parameter-free edge encoding runs once, ahead of the stochastic type embedding
        assert split.trunk == ["spharm", "edge_norm", "bessel_encode", "factor"]
        assert split.tail_names[0] == "type_embed"


@pytest.mark.parametrize("kind", ["partial", "full"])
def test_property_driven_results_equal_the_all_at_once_results(tio2, kind):
    config = ModelConfig.from_dict({**CONFIG.to_dict(), "noise": "head"})
    post = partial_posterior(config=config) if kind == "partial" else full_posterior(config=config)
    post = post.with_calibration({"energy": 1.3, "forces": 0.8})
    stepwise, at_once = tio2.copy(), tio2.copy()
    stepwise.calc = UQCalculator(post, return_samples=True)
    at_once.calc = UQCalculator(post, return_samples=True)
    keys = at_once.calc.implemented_properties
    at_once.calc.calculate(at_once, keys)
    assert set(at_once.calc.results) == set(keys)
    assert at_once.calc.pullbacks == post.n_samples  # the mean forces come from the samples' forces
    for key in ("forces", "energy_std", "stress", "atom_force_std", "forces_samples", "stress_std"):
        stepwise.calc.get_property(key, stepwise)  # as ASE asks: one key at a time, the mean forces first
    assert stepwise.calc.pullbacks == post.n_samples  # 1 for the mean, K - 1 more for the samples
    for key in keys:
        np.testing.assert_allclose(stepwise.calc.results[key], at_once.calc.results[key], rtol=1e-10, atol=1e-12,
                                   err_msg=key)
    assert np.ptp(at_once.calc.results["forces_samples"], axis=0).min() > 1e-6  # the samples really differ


@pytest.mark.parametrize("batched", [False, True])
def test_per_sample_gradients_after_the_mean_equal_a_fresh_pass(tio2, batched):
    post = partial_posterior(k=3)
    graph = collate([atoms_to_graph(tio2, CONFIG.type_names, CONFIG.r_max, with_labels=False)])
    fresh = predict_samples(post, graph, batched=batched)
    evaluation = SamplePass(post, graph)
    mean = evaluation.predictions(per_sample=False)
    assert mean.forces is None and evaluation.pullbacks == 1
    torch.testing.assert_close(mean.mean_forces, fresh.forces.mean(0), rtol=1e-10, atol=1e-12)
    later = evaluation.predictions(per_sample=True, batched=batched)
    assert evaluation.pullbacks == 3  # one sample's gradient follows from the mean and the other two
    torch.testing.assert_close(later.forces, fresh.forces, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(later.stress, fresh.stress, rtol=1e-10, atol=1e-12)


def test_a_forces_only_step_pulls_back_once(tio2):
    k = 4
    atoms = tio2.copy()
    atoms.calc = calc = UQCalculator(partial_posterior(k=k))
    atoms.get_forces()  # what every ASE dynamics step asks
    assert calc.pullbacks == 1
    assert not FORCE_UNCERTAINTY_PROPERTIES & set(calc.results)
    assert {"energy", "forces", "stress", "energy_std", "energies_std"} <= set(calc.results)
    for key in ("energy", "energy_std", "energies_std", "stress"):  # come with the same pass
        calc.get_property(key, atoms)
    assert calc.pullbacks == 1
    calc.get_property("atom_force_std", atoms)
    assert calc.pullbacks == k and {"forces_std", "stress_std"} <= set(calc.results)
    calc.get_property("forces_std_epistemic", atoms)  # nothing twice for the same positions
    assert calc.pullbacks == k
    atoms.positions[0] += 0.01
    atoms.get_forces()
    assert calc.pullbacks == k + 1 and "atom_force_std" not in calc.results
    # without the kept trunk graph a later force-uncertainty key re-evaluates the model: same numbers, K pull-backs
    freed = atoms.copy()
    freed.calc = UQCalculator(partial_posterior(k=k), keep_trunk_graph=False)
    np.testing.assert_array_equal(freed.get_forces(), atoms.get_forces())
    np.testing.assert_allclose(freed.calc.get_property("atom_force_std", freed),
                               calc.get_property("atom_force_std", atoms), rtol=1e-10)
    assert freed.calc.pullbacks == 1 + k and calc.pullbacks == 2 * k


def test_forces_and_stress_match_finite_differences(tio2):
    atoms = tio2.copy()
    atoms.calc = UQCalculator(full_posterior((0, 1)))
    forces, stress = atoms.get_forces(), atoms.get_stress()
    np.testing.assert_allclose(calculate_numerical_forces(atoms, eps=1e-4), forces, atol=1e-6)
    np.testing.assert_allclose(calculate_numerical_stress(atoms, eps=1e-5), stress, atol=1e-7)
    assert np.abs(forces).max() > 1e-2 and np.abs(stress).max() > 1e-4  # the comparison is not trivial
    # forces are the gradient of the same mean energy the calculator reports
    assert atoms.get_potential_energy() == pytest.approx(atoms.calc.results["energies"].sum(), abs=1e-9)


def test_identical_samples_give_zero_epistemic_std_and_the_noise_alone(tio2):
    atoms = tio2.copy()
    atoms.calc = UQCalculator(full_posterior((3, 3, 3)))
    for key in ("energy_std_epistemic", "forces_std_epistemic", "atom_force_std_epistemic", "energies_std"):
        np.testing.assert_array_equal(atoms.calc.get_property(key, atoms), 0.0)
    sigma = CONFIG.force_noise, CONFIG.energy_noise * len(atoms), CONFIG.stress_noise
    np.testing.assert_allclose(atoms.calc.get_property("forces_std", atoms), sigma[0], rtol=1e-12)
    np.testing.assert_allclose(atoms.calc.get_property("energy_std", atoms), sigma[1], rtol=1e-12)
    np.testing.assert_allclose(atoms.calc.get_property("stress_std", atoms), sigma[2], rtol=1e-12)


def test_std_equals_numpy_std_of_the_samples(tio2):
    atoms = tio2.copy()
    atoms.calc = UQCalculator(full_posterior(), return_samples=True)
    calc = atoms.calc
    e, f = calc.get_property("energy_samples", atoms), calc.get_property("forces_samples", atoms)
    assert e.shape == (4,) and f.shape == (4, len(atoms), 3)
    assert calc.get_property("energy", atoms) == pytest.approx(e.mean(), rel=1e-14)
    assert calc.get_property("energy_std_epistemic", atoms) == pytest.approx(np.std(e), rel=1e-10)
    np.testing.assert_allclose(calc.get_property("forces", atoms), f.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(calc.get_property("forces_std_epistemic", atoms), np.std(f, axis=0), rtol=1e-9,
                               atol=1e-14)
    np.testing.assert_allclose(calc.get_property("atom_force_std_epistemic", atoms),
                               np.sqrt(np.var(f, axis=0).sum(-1)), rtol=1e-9)
    assert np.std(e) > 1e-3 and np.std(f, axis=0).min() > 0  # different samples really differ
    # the total adds the noise variance (every sample at the configured stds here)
    np.testing.assert_allclose(calc.results["forces_std"] ** 2, np.var(f, axis=0) + CONFIG.force_noise**2, rtol=1e-9)
    assert calc.results["energy_std"] ** 2 == pytest.approx(np.var(e) + (CONFIG.energy_noise * len(atoms)) ** 2,
                                                            rel=1e-9)


def test_unequal_weights_give_the_weighted_moments(tio2):
    atoms = tio2.copy()
    w = np.array([0.1, 0.2, 0.3, 0.4])
    atoms.calc = UQCalculator(full_posterior(weights=torch.tensor(w)), return_samples=True)
    e = atoms.calc.get_property("energy_samples", atoms)
    mean = np.sum(w * e)
    assert atoms.get_potential_energy() == pytest.approx(mean, rel=1e-13)
    assert atoms.calc.results["energy_std_epistemic"] == pytest.approx(np.sqrt(np.sum(w * (e - mean) ** 2)),
                                                                       rel=1e-10)


@pytest.mark.parametrize("noise", ["learned", "fixed"])
def test_a_predictive_std_is_its_epistemic_and_aleatoric_parts_never_below_the_aleatoric(tio2, noise):
    config = ModelConfig.from_dict({**CONFIG.to_dict(), "noise": noise, "force_noise": 0.2, "energy_noise": 0.003})
    atoms = tio2.copy()
    post = full_posterior((0, 1), config=config)
    atoms.calc = UQCalculator(post)
    atoms.calc.get_property("forces_std", atoms)
    r = atoms.calc.results
    n = len(atoms)
    # the configured stds (the learned log-factors start at zero): (N σ_e)² for the total energy, σ_f² per component
    np.testing.assert_allclose(r["forces_std"] ** 2 - r["forces_std_epistemic"] ** 2, 0.2**2, rtol=1e-6)
    np.testing.assert_allclose(r["energy_std"] ** 2 - r["energy_std_epistemic"] ** 2, (n * 0.003) ** 2, rtol=1e-6)
    assert r["forces_std_epistemic"].max() > 0 and r["energy_std_epistemic"] > 0
    single = tio2.copy()  # one sample: the std is the aleatoric part alone
    single.calc = UQCalculator(Posterior.from_state_dicts(config, [post.state_dict(0)]))
    np.testing.assert_allclose(single.calc.get_property("atom_force_std", single), np.sqrt(3) * 0.2, rtol=1e-6)
    assert single.calc.get_property("energy_std", single) == pytest.approx(n * 0.003, rel=1e-6)


def test_every_advertised_key_is_gettable_and_the_class_list_is_untouched(tio2):
    before = list(UQCalculator.implemented_properties)
    for return_samples in (False, True):
        atoms = tio2.copy()
        atoms.calc = UQCalculator(full_posterior((0, 1)), return_samples=return_samples)
        for key in atoms.calc.implemented_properties:
            value = atoms.calc.get_property(key, atoms)
            assert np.all(np.isfinite(value)), key
        assert ("energy_samples" in atoms.calc.implemented_properties) == return_samples
    assert UQCalculator.implemented_properties == before
    assert "energy_samples" not in UQCalculator.implemented_properties


def test_float32_model_agrees_with_float64(tio2):
    post = full_posterior((0, 1))
    a64, a32 = tio2.copy(), tio2.copy()
    a64.calc, a32.calc = UQCalculator(post), UQCalculator(post, dtype="float32")
    assert a32.calc.posterior.config.dtype == "float32" and post.config.dtype == "float64"
    assert a32.get_potential_energy() == pytest.approx(a64.get_potential_energy(), rel=1e-5)
    np.testing.assert_allclose(a32.get_forces(), a64.get_forces(), atol=1e-4)
    np.testing.assert_allclose(a32.calc.get_property("atom_force_std", a32), a64.calc.get_property("atom_force_std", a64),
                               rtol=1e-3, atol=1e-5)


def test_reused_neighbour_list_gives_fresh_list_results(tio2):
    post = full_posterior((0, 1))
    moving, fresh = tio2.copy(), tio2.copy()
    moving.calc, fresh.calc = UQCalculator(post, skin=0.6), UQCalculator(post, skin=0.0)
    rng = np.random.default_rng(0)
    builds = []
    for _ in range(6):
        step = rng.normal(0.0, 0.04, moving.positions.shape)
        moving.positions += step
        fresh.positions += step
        for key in ("energy", "forces", "stress", "atom_force_std", "energies_std"):
            np.testing.assert_allclose(moving.calc.get_property(key, moving), fresh.calc.get_property(key, fresh),
                                       rtol=1e-10, atol=1e-12)
        builds.append(moving.calc.neighbor_list_builds)
    assert builds[0] == 1 and builds[-1] < 6  # reused while atoms stay within skin/2
    assert fresh.calc.neighbor_list_builds == 6
    moving.positions[0] += [0.35, 0.0, 0.0]  # beyond skin/2: rebuilt
    moving.get_potential_energy()
    assert moving.calc.neighbor_list_builds == builds[-1] + 1
    moving.set_cell(moving.cell * 1.01, scale_atoms=True)  # a new cell: rebuilt
    moving.get_potential_energy()
    assert moving.calc.neighbor_list_builds == builds[-1] + 2


def test_extxyz_round_trip_keeps_the_uncertainties(tio2, tmp_path):
    atoms = tio2.copy()
    atoms.calc = UQCalculator(full_posterior((0, 1, 2)), return_samples=True)
    uq_to_atoms(atoms)
    ase.io.write(tmp_path / "uq.extxyz", atoms, format="extxyz")
    back = ase.io.read(tmp_path / "uq.extxyz", format="extxyz")
    r = atoms.calc.results
    tol = dict(rtol=1e-7, atol=1e-8)  # extxyz writes 8 decimals
    assert back.get_potential_energy() == pytest.approx(r["energy"], abs=1e-8)
    np.testing.assert_allclose(back.get_forces(), r["forces"], **tol)
    for key in ("energies_std", "forces_std", "atom_force_std", "forces_std_epistemic", "atom_force_std_epistemic"):
        np.testing.assert_allclose(back.arrays[key], r[key], **tol, err_msg=key)
    for key in ("energy_std", "energy_std_epistemic", "stress_std", "energy_samples"):
        np.testing.assert_allclose(back.info[key], r[key], **tol, err_msg=key)
    samples = back.arrays["forces_samples"].reshape(len(atoms), 3, 3).transpose(1, 0, 2)
    np.testing.assert_allclose(samples, r["forces_samples"], **tol)
    assert r["forces_std"].min() > 1e-5  # the round trip carries real values


def test_molecule_without_cell_has_no_stress():
    config = ModelConfig(type_names=["H", "C", "O"], r_max=4.0, num_layers=1, num_features=4)
    atoms = molecule("CH3CH2OH")
    atoms.calc = UQCalculator(full_posterior((0, 1), config=config))
    assert atoms.calc.get_property("atom_force_std", atoms).shape == (9,)
    assert "stress" not in atoms.calc.results
    with pytest.raises(ValueError, match="without a periodic cell"):
        atoms.get_stress()
    with pytest.raises(ValueError, match="without a periodic cell"):
        atoms.calc.get_property("stress_std", atoms)


def test_bad_inputs_raise_before_the_model_runs(tio2, monkeypatch):
    calls = []
    original = calculator_module.SamplePass
    monkeypatch.setattr(calculator_module, "SamplePass", lambda *a, **k: calls.append(1) or original(*a, **k))
    calc = UQCalculator(full_posterior((0, 1)))
    atoms = tio2.copy()
    atoms.calc = calc
    atoms.positions[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in the positions of atom\(s\) \[3\]"):
        atoms.get_potential_energy()
    atoms = tio2.copy()
    atoms.calc = calc
    atoms.cell[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf in the cell"):
        atoms.get_forces()
    atoms = tio2.copy()
    atoms.calc = calc
    atoms[0].symbol = "Cu"
    with pytest.raises(ValueError, match=r"element\(s\) \['Cu'\] not known to the model"):
        atoms.get_forces()
    assert calls == []
    with pytest.raises(ValueError, match="dtype"):
        UQCalculator(full_posterior((0,)), dtype="float16")
    with pytest.raises(ValueError, match="skin"):
        UQCalculator(full_posterior((0,)), skin=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_calculator_equals_cpu(tio2):
    post = partial_posterior()
    cpu, gpu = tio2.copy(), tio2.copy()
    cpu.calc, gpu.calc = UQCalculator(post), UQCalculator(partial_posterior(), device="cuda")
    for key in ("energy", "forces", "stress", "atom_force_std", "energy_std"):
        np.testing.assert_allclose(gpu.calc.get_property(key, gpu), cpu.calc.get_property(key, cpu),
                                   rtol=1e-9, atol=1e-10)


def test_calculator_and_evaluate_report_the_same_moments(tio2):
    from mlip_uq.evaluate import predict_graphs

    post = full_posterior((0, 1, 2), calibration={"energy": 1.5, "forces": 0.7})
    atoms = tio2.copy()
    atoms.calc = UQCalculator(post)
    graph = atoms_to_graph(atoms, CONFIG.type_names, CONFIG.r_max, with_labels=False)
    graph.update({AtomicDataDict.TOTAL_ENERGY_KEY: torch.zeros(1, 1), AtomicDataDict.FORCE_KEY: torch.zeros(len(atoms), 3)})
    pred = predict_graphs(post, [graph])
    np.testing.assert_allclose(pred.forces_pred, atoms.get_forces(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(pred.forces_std, atoms.calc.get_property("forces_std", atoms), rtol=1e-12)
    assert pred.energy_std[0] * len(atoms) == pytest.approx(atoms.calc.get_property("energy_std", atoms), rel=1e-12)
