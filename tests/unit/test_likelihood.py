"""The Gaussian likelihood, with the noise stds the model writes, against a hand computation."""

import math

import pytest
import torch
from nequip.data import AtomicDataDict

from mlip_uq._keys import ENERGY_LOG_SIGMA_KEY, PER_ATOM_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY
from mlip_uq.inference.loss import (
    LossWeights,
    loss_terms,
    neg_log_likelihood,
    profile_neg_log_likelihood,
    squared_error_sums,
    weighted_loss,
)

ENERGY_SIGMA, STRESS_SIGMA = 0.02, 0.05


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
        ENERGY_LOG_SIGMA_KEY: torch.full((2, 1), math.log(ENERGY_SIGMA), dtype=torch.float64),
        STRESS_LOG_SIGMA_KEY: torch.full((2, 1), math.log(STRESS_SIGMA), dtype=torch.float64),
    }
    return out, batch


def normal_nll(err, sigma):
    return 0.5 * (err / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)


def test_likelihood_is_the_sum_over_labels_of_each_frame_with_the_models_noise():
    out, batch = fake_batch()
    nll = neg_log_likelihood(out, batch)
    sigma = out[PER_ATOM_LOG_SIGMA_KEY].exp().view(-1)
    for frame, atoms, n in ((0, [0, 1], 2), (1, [2, 3, 4], 3)):
        e = (out["total_energy"][frame, 0] - batch["total_energy"][frame, 0]).item() / n
        expected = normal_nll(e, ENERGY_SIGMA)
        expected += sum(normal_nll((out["forces"][a, c] - batch["forces"][a, c]).item(), sigma[a].item())
                        for a in atoms for c in range(3))
        expected += sum(normal_nll(x.item(), STRESS_SIGMA)
                        for x in (out["stress"][frame] - batch["stress"][frame]).flatten())
        assert abs(nll[frame].item() - expected) < 1e-10 * abs(expected)


def test_loss_terms_are_per_frame_nlls_summing_to_the_likelihood_and_reach_every_log_sigma():
    out, batch = fake_batch()
    for key in (PER_ATOM_LOG_SIGMA_KEY, ENERGY_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY):
        out[key].requires_grad_(True)
    terms = loss_terms(out, batch)
    e = (out["total_energy"] - batch["total_energy"]).view(-1) / torch.tensor([2.0, 3.0], dtype=torch.float64)
    expected_e = sum(normal_nll(x.item(), ENERGY_SIGMA) for x in e) / 2
    sigma = out[PER_ATOM_LOG_SIGMA_KEY].detach().exp().view(-1)
    f = (out["forces"] - batch["forces"]).detach()
    expected_f = sum(normal_nll(f[a, c].item(), sigma[a].item()) for a in range(5) for c in range(3)) / 2
    assert abs(terms["energy"].item() - expected_e) < 1e-10 * abs(expected_e)
    assert abs(terms["forces"].item() - expected_f) < 1e-10 * abs(expected_f)
    total = weighted_loss(terms, LossWeights())  # the default weights: the mean NLL per frame
    assert abs(total.item() - neg_log_likelihood(out, batch).mean().item()) < 1e-10 * abs(total.item())
    total.backward()
    for key in (PER_ATOM_LOG_SIGMA_KEY, ENERGY_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY):
        assert out[key].grad.abs().min() > 0, key


def test_power_likelihood_weights_each_label_term_and_equals_the_weighted_training_loss():
    out, batch = fake_batch()
    parts = {}  # each term alone: the others weighted 0
    for name in ("energy", "forces", "stress"):
        only = LossWeights(**{k: float(k == name) for k in ("energy", "forces", "stress")})
        parts[name] = neg_log_likelihood(out, batch, only)
    torch.testing.assert_close(sum(parts.values()), neg_log_likelihood(out, batch), rtol=1e-12, atol=0)
    weights = LossWeights(energy=20.0, forces=0.5, stress=3.0)
    expected = 20.0 * parts["energy"] + 0.5 * parts["forces"] + 3.0 * parts["stress"]
    weighted = neg_log_likelihood(out, batch, weights)
    torch.testing.assert_close(weighted, expected, rtol=1e-12, atol=0)
    # the frame mean is the MAP training loss with the same weights
    terms = loss_terms(out, batch)
    assert abs(weighted.mean().item() - weighted_loss(terms, weights).item()) < 1e-10 * abs(weighted.mean().item())


def test_likelihood_weights_are_read_from_a_method_section():
    from mlip_uq.config import ConfigError
    from mlip_uq.inference.sgmcmc import SGMCMCSettings
    from mlip_uq.inference.vi import VISettings

    settings = SGMCMCSettings.from_dict({"sgmcmc": {"likelihood_weights": {"energy": 20.0}}})
    assert settings.likelihood_weights == LossWeights(energy=20.0)
    assert VISettings.from_dict({"vi": {"init": "x.h5", "likelihood_weights": {"forces": 2.0}}}).likelihood_weights \
        == LossWeights(forces=2.0)
    with pytest.raises(ConfigError, match="sgmcmc.likelihood_weights"):
        SGMCMCSettings.from_dict({"sgmcmc": {"likelihood_weights": {"energies": 20.0}}})


def test_profile_likelihood_is_the_nll_at_each_terms_best_constant_sigma():
    out, batch = fake_batch()
    sums = squared_error_sums(out, batch)
    rmse = {name: (sse / count).sqrt() for name, (sse, count) in sums.items()}
    out[PER_ATOM_LOG_SIGMA_KEY] = torch.full((5, 1), rmse["forces"].log().item(), dtype=torch.float64)
    out[ENERGY_LOG_SIGMA_KEY] = torch.full((2, 1), rmse["energy"].log().item(), dtype=torch.float64)
    out[STRESS_LOG_SIGMA_KEY] = torch.full((2, 1), rmse["stress"].log().item(), dtype=torch.float64)
    at_best = weighted_loss(loss_terms(out, batch), LossWeights()).item()
    assert profile_neg_log_likelihood(sums, 2, LossWeights()) == pytest.approx(at_best, rel=1e-12)
    # any other constant σ gives a larger NLL
    out[PER_ATOM_LOG_SIGMA_KEY] = out[PER_ATOM_LOG_SIGMA_KEY] + 0.1
    assert weighted_loss(loss_terms(out, batch), LossWeights()).item() > at_best
