"""The posterior contract (:mod:`mlip_uq.testing`) on untrained posteriors: a noise-head ensemble with unequal
weights and a partially Bayesian one (the trained posteriors of every method run it in tests/integration)."""

import pytest
import torch
from conftest import seeded_posterior, tiny_model_config

from mlip_uq.testing import PosteriorContract

READOUT = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"


class TestWeightedNoiseHeadEnsemble(PosteriorContract):
    @pytest.fixture
    def contract_posterior(self):
        config = tiny_model_config(["O", "Ti"], r_max=4.0, avg_num_neighbors=10.0, noise="head")
        post = seeded_posterior(config, method="ensemble", calibration={"forces": 1.5},
                                energy_references={"O": -1.0, "Ti": -2.0}, data_fingerprint="abc")
        return post.replace(weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


class TestPartiallyBayesianPosterior(PosteriorContract):
    @pytest.fixture
    def contract_posterior(self):
        post = seeded_posterior(tiny_model_config(["O", "Ti"], avg_num_neighbors=10.0), seeds=(0, 1))
        shared = {**post.shared, **{n: t[0] for n, t in post.samples.items() if n != READOUT}}
        return post.replace(shared=shared, samples={READOUT: post.samples[READOUT]}, hyperparameters={"partial": True})


def test_replace_rejects_unknown_arguments():
    post = seeded_posterior(tiny_model_config(["O"]), seeds=(0,))
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['sample'\]"):
        post.replace(sample={})
