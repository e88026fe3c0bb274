"""The NequIP model of mlip_uq: symmetries, autograd forces/stress against finite differences, isolated atoms."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from nequip.utils import torch_default_dtype
from nequip.utils.test import assert_AtomicData_equivariant

from mlip_uq._keys import ENERGY_LOG_SIGMA_KEY, PER_ATOM_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY
from mlip_uq.data.graph import atoms_to_graph
from mlip_uq.model import ModelConfig, build_model

#: every build here is a real build (not a copy of the session's first build of the same model, tests/conftest.py):
#: these tests check the builds themselves, e.g. that a seed gives the same parameters
FRESH_MODELS = True
TYPE_NAMES = ["H", "C", "O", "Ti"]
SHIFTS = {"H": -13.6, "C": -1030.0, "O": -432.5, "Ti": -1604.6}


def make_model(dtype="float64", noise="head", **kw):
    config = ModelConfig(
        type_names=TYPE_NAMES, r_max=4.0, num_layers=2, l_max=2, num_features=8, radial_mlp_width=16,
        energy_shifts=SHIFTS, energy_scale=1.3, avg_num_neighbors=8.0, noise=noise, dtype=dtype, **kw,
    )
    return build_model(config).eval()


@pytest.fixture(scope="module")
def model():
    """The default :func:`make_model`, built once for the tests that only evaluate it."""
    return make_model()


def rattled_rutile():
    atoms = Atoms("Ti2O4", scaled_positions=[[0, 0, 0], [.5, .5, .5], [.3, .3, 0], [.7, .7, 0], [.8, .2, .5], [.2, .8, .5]],
                  cell=[4.6, 4.6, 2.96], pbc=True)
    atoms.rattle(0.05, seed=3)
    return atoms


def ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.02, seed=1)
    return atoms


def predict(model, atoms, dtype=torch.float64):
    out = model(atoms_to_graph(atoms, TYPE_NAMES, 4.0, dtype=dtype, with_labels=False))
    return {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("make_atoms", [ethanol, rattled_rutile])
def test_equivariance_rotation_reflection_translation_permutation(dtype, make_atoms):
    model = make_model(dtype)
    atoms = make_atoms()
    data = atoms_to_graph(atoms, TYPE_NAMES, 4.0, dtype=getattr(torch, dtype), with_labels=False)
    if not atoms.pbc.any():
        # a molecule has no volume: nequip then reports NaN stress, which no rotation can compare
        data = {k: v for k, v in data.items() if k not in ("cell", "edge_cell_shift", "pbc")}
    # nequip's own checker (rotations, parity, translations and node permutations of every declared output,
    # at its float32/float64 tolerances); it draws its transformations in the default dtype
    with torch_default_dtype(getattr(torch, dtype)):
        assert_AtomicData_equivariant(model, data)


def test_outputs_transform_as_physics_says(model):
    atoms = rattled_rutile()
    ref = predict(model, atoms)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.linalg.det(q)) * -1  # an improper rotation (reflection included)
    moved = atoms.copy()
    moved.set_cell(atoms.cell @ q.T, scale_atoms=False)
    moved.positions = atoms.positions @ q.T + np.array([0.3, -1.2, 2.0])
    perm = rng.permutation(len(atoms))
    moved = moved[perm]
    out = predict(model, moved)
    torch.testing.assert_close(out["total_energy"], ref["total_energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["forces"], ref["forces"][perm] @ torch.as_tensor(q.T), rtol=0, atol=1e-10)
    torch.testing.assert_close(out[PER_ATOM_LOG_SIGMA_KEY], ref[PER_ATOM_LOG_SIGMA_KEY][perm], rtol=0, atol=1e-10)
    stress_rot = torch.as_tensor(q) @ ref["stress"].view(3, 3) @ torch.as_tensor(q.T)
    torch.testing.assert_close(out["stress"].view(3, 3), stress_rot, rtol=0, atol=1e-10)


def test_forces_match_central_differences(model):
    atoms = ethanol()
    forces = predict(model, atoms)["forces"].numpy()
    h = 1e-4
    fd = np.zeros_like(forces)
    for i in range(len(atoms)):
        for j in range(3):
            energies = []
            for sign in (1, -1):
                displaced = atoms.copy()
                displaced.positions[i, j] += sign * h
                energies.append(predict(model, displaced)["total_energy"].item())
            fd[i, j] = -(energies[0] - energies[1]) / (2 * h)
    np.testing.assert_allclose(forces, fd, atol=1e-7, rtol=0)


def test_stress_matches_central_differences_of_strain(model):
    atoms = rattled_rutile()
    stress = predict(model, atoms)["stress"].view(3, 3).numpy()
    h = 1e-5
    volume = atoms.get_volume()
    fd = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            energies = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[i, j] += sign * h
                strained = atoms.copy()
                strained.set_cell(atoms.cell @ strain.T, scale_atoms=True)
                energies.append(predict(model, strained)["total_energy"].item())
            fd[i, j] = (energies[0] - energies[1]) / (2 * h) / volume
    fd = 0.5 * (fd + fd.T)
    np.testing.assert_allclose(stress, fd, atol=1e-8, rtol=0)


@pytest.mark.parametrize("element", ["H", "O", "Ti"])
def test_isolated_atom_energy_equals_its_reference(model, element):
    out = predict(model, Atoms(element, positions=[[0.0, 0.0, 0.0]]))
    assert out["total_energy"].item() == pytest.approx(SHIFTS[element], abs=1e-12)
    np.testing.assert_array_equal(out["forces"].numpy(), 0.0)


def test_atoms_beyond_cutoff_do_not_interact(model):
    far = Atoms("OTi", positions=[[0, 0, 0], [0, 0, 4.5]])  # 4.5 Å > r_max = 4 Å
    assert predict(model, far)["total_energy"].item() == pytest.approx(SHIFTS["O"] + SHIFTS["Ti"], abs=1e-12)


@pytest.mark.parametrize("noise", ["learned", "head", "fixed"])
def test_every_model_writes_its_noise_stds_starting_at_the_configured_ones(noise):
    model = make_model(noise=noise, force_noise=0.2, energy_noise=0.003, stress_noise=0.05)
    out = predict(model, ethanol())
    torch.testing.assert_close(out[PER_ATOM_LOG_SIGMA_KEY].exp(), torch.full((9, 1), 0.2, dtype=torch.float64))
    torch.testing.assert_close(out[ENERGY_LOG_SIGMA_KEY].exp(), torch.full((1, 1), 0.003, dtype=torch.float64))
    torch.testing.assert_close(out[STRESS_LOG_SIGMA_KEY].exp(), torch.full((1, 1), 0.05, dtype=torch.float64))
    noise_params = {n for n, _ in model.named_parameters() if "noise" in n}
    expected = {f"model.func.observation_noise.{q}_log_factor" for q in ("force", "energy", "stress")}
    if noise == "head":
        expected |= {"model.func.noise_head.mlp_module.mlp.0.weight"}
    assert noise_params == (set() if noise == "fixed" else expected)


def test_noise_head_makes_the_force_noise_differ_between_atoms_of_one_element():
    model = make_model(noise="head")
    with torch.no_grad():
        model.model.func.noise_head.mlp_module.mlp[0].weight.normal_()
    out = predict(model, ethanol())
    log_sigma = out[PER_ATOM_LOG_SIGMA_KEY].view(-1)
    hydrogens = [i for i, z in enumerate(ethanol().numbers) if z == 1]
    assert log_sigma[hydrogens].std() > 1e-3
    # the energy noise is the configured σ_e times the frame's mean head factor (σ_i / its element's σ)
    factor = (log_sigma - model.model.func.observation_noise.force_log_sigma0[0].item()).exp().mean()
    assert out[ENERGY_LOG_SIGMA_KEY].exp().item() == pytest.approx(0.01 * factor.item(), rel=1e-10)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(type_names=["H"], dtype="float16")
    with pytest.raises(ValueError, match="energy_shifts has no value.*'O'"):
        ModelConfig(type_names=["H", "O"], energy_shifts={"H": -13.6})
    with pytest.raises(ValueError, match="unknown model option.*'n_layers'"):
        ModelConfig.from_dict({"type_names": ["H"], "n_layers": 3})


def test_same_seed_same_parameters_other_seed_other_parameters():
    a, b, c = make_model(seed=1), make_model(seed=1), make_model(seed=2)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
