"""The Gaussian likelihood used by the samplers, against a hand computation."""

import math

import torch
from nequip.data import AtomicDataDict

from mlip_uq._keys import PER_ATOM_LOG_SIGMA_KEY
from mlip_uq.inference.loss import NoiseModel, neg_log_likelihood


def fake_batch():
    g = torch.Generator().manual_seed(0)
    batch = {
        AtomicDataDict.POSITIONS_KEY: torch.zeros(5, 3),
        AtomicDataDict.BATCH_KEY: torch.tensor([0, 0, 1, 1, 1]),
        AtomicDataDict.NUM_NODES_KEY: torch.tensor([2, 3]),
        AtomicDataDict.TOTAL_ENERGY_KEY: torch.randn(2, 1, generator=g, dtype=torch.float64),
        AtomicDataDict.FORCE_KEY: torch.randn(5, 3, generator=g, dtype=torch.float64),
        AtomicDataDict.STRESS_KEY: torch.randn(2, 3, 3, generator=g, dtype=torch.float64),
    }
    out = {
        AtomicDataDict.TOTAL_ENERGY_KEY: torch.randn(2, 1, generator=g, dtype=torch.float64),
        AtomicDataDict.FORCE_KEY: torch.randn(5, 3, generator=g, dtype=torch.float64),
        AtomicDataDict.STRESS_KEY: torch.randn(2, 3, 3, generator=g, dtype=torch.float64),
        PER_ATOM_LOG_SIGMA_KEY: torch.randn(5, 1, generator=g, dtype=torch.float64) * 0.3 - 1.0,
    }
    return out, batch


def normal_nll(err, sigma):
    return 0.5 * (err / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)


def test_fixed_noise_likelihood_is_the_sum_over_labels_of_each_frame():
    out, batch = fake_batch()
    noise = NoiseModel(energy=0.02, forces=0.3, stress=0.05)
    nll = neg_log_likelihood(out, batch, noise)
    for frame, atoms, n in ((0, [0, 1], 2), (1, [2, 3, 4], 3)):
        e = (out["total_energy"][frame, 0] - batch["total_energy"][frame, 0]).item() / n
        expected = normal_nll(e, 0.02)
        expected += sum(normal_nll((out["forces"][a, c] - batch["forces"][a, c]).item(), 0.3) for a in atoms for c in range(3))
        expected += sum(normal_nll(x.item(), 0.05) for x in (out["stress"][frame] - batch["stress"][frame]).flatten())
        assert abs(nll[frame].item() - expected) < 1e-10 * abs(expected)


def test_heteroscedastic_forces_use_each_atoms_sigma():
    out, batch = fake_batch()
    del batch["stress"]
    nll = neg_log_likelihood(out, batch, NoiseModel(energy=0.02, heteroscedastic=True))
    sigma = out[PER_ATOM_LOG_SIGMA_KEY].exp().view(-1)
    e = (out["total_energy"][1, 0] - batch["total_energy"][1, 0]).item() / 3
    expected = normal_nll(e, 0.02) + sum(
        normal_nll((out["forces"][a, c] - batch["forces"][a, c]).item(), sigma[a].item()) for a in (2, 3, 4) for c in range(3)
    )
    assert abs(nll[1].item() - expected) < 1e-10
    # the gradient reaches the noise head
    out[PER_ATOM_LOG_SIGMA_KEY].requires_grad_(True)
    neg_log_likelihood(out, batch, NoiseModel(heteroscedastic=True)).sum().backward()
    assert out[PER_ATOM_LOG_SIGMA_KEY].grad.abs().min() > 0
