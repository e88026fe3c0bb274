"""float32, the default model dtype: nequip's float64 energy sum, the likelihood on mixed dtypes, and every
training method run a few steps end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_tio2_config
from nequip.data import AtomicDataDict

from mlip_uq._keys import ENERGY_LOG_SIGMA_KEY, PER_ATOM_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY
from mlip_uq.data import atoms_to_graph, read_frames
from mlip_uq.inference.loss import loss_terms, neg_log_likelihood
from mlip_uq.model import ModelConfig, build_model
from mlip_uq.posterior import load_posterior
from mlip_uq.train import train

METHODS = {
    "map": {},
    "ensemble": {"ensemble": {"n_members": 2}},
    "dropout": {"dropout": {"n_samples": 3}},
    "vi": {"vi": {"steps": 6, "batch_size": 8, "lr": 2e-3, "n_samples": 3, "checkpoint_every": 10,
                  "trace_every": 2, "init": "map"}},
    "sgmcmc": {"sgmcmc": {"lr": 2e-4, "batch_size": 8, "burnin_steps": 6, "preheat_steps": 2, "n_samples": 3,
                          "thinning": 2, "n_chains": 1, "checkpoint_every": 10, "trace_every": 2}},
}
SAMPLES = {"map": 1, "ensemble": 2, "dropout": 3, "vi": 3, "sgmcmc": 3}


def test_float32_is_the_default_and_the_energy_is_summed_in_float64(tio2_path):
    config = ModelConfig(type_names=["O", "Ti"], r_max=4.0, num_layers=1, num_features=4, radial_mlp_width=8)
    assert config.dtype == "float32"
    model = build_model(config)
    assert {p.dtype for p in model.parameters() if p.numel() > 1} == {torch.float32}
    graph = atoms_to_graph(read_frames(tio2_path, index=0)[0], config.type_names, config.r_max, dtype=torch.float32)
    out = model(graph)
    assert out[AtomicDataDict.TOTAL_ENERGY_KEY].dtype == torch.float64  # nequip's per-type shift casts up
    assert out[AtomicDataDict.FORCE_KEY].dtype == torch.float32


def mixed_dtype_output(seed=0):
    """A float64 energy with float32 forces, stress and log σ (what a float32 model returns), its labels, and
    the same output cast to float64."""
    g = torch.Generator().manual_seed(seed)
    f32 = dict(generator=g, dtype=torch.float32)
    batch = {
        AtomicDataDict.POSITIONS_KEY: torch.zeros(5, 3, dtype=torch.float32),
        AtomicDataDict.BATCH_KEY: torch.tensor([0, 0, 1, 1, 1]),
        AtomicDataDict.NUM_NODES_KEY: torch.tensor([2, 3]),
        AtomicDataDict.TOTAL_ENERGY_KEY: torch.randn(2, 1, **f32),
        AtomicDataDict.FORCE_KEY: torch.randn(5, 3, **f32),
        AtomicDataDict.STRESS_KEY: torch.randn(2, 3, 3, **f32),
    }
    out = {
        AtomicDataDict.TOTAL_ENERGY_KEY: torch.randn(2, 1, generator=g, dtype=torch.float64),
        AtomicDataDict.FORCE_KEY: torch.randn(5, 3, **f32),
        AtomicDataDict.STRESS_KEY: torch.randn(2, 3, 3, **f32),
        PER_ATOM_LOG_SIGMA_KEY: torch.randn(5, 1, **f32) * 0.3 - 1.0,
        ENERGY_LOG_SIGMA_KEY: torch.full((2, 1), -4.0, dtype=torch.float32),
        STRESS_LOG_SIGMA_KEY: torch.full((2, 1), -3.0, dtype=torch.float32),
    }
    as64 = lambda d: {k: v.double() if v.is_floating_point() else v for k, v in d.items()}  # noqa: E731
    return out, batch, as64(out), as64(batch)


def test_likelihood_of_a_float32_model_is_float64_and_equals_the_float64_computation():
    out, batch, out64, batch64 = mixed_dtype_output()
    nll = neg_log_likelihood(out, batch)
    assert nll.dtype == torch.float64 and nll.shape == (2,)
    torch.testing.assert_close(nll, neg_log_likelihood(out64, batch64), rtol=1e-6, atol=0)
    terms = loss_terms(out, batch)
    for name, value in loss_terms(out64, batch64).items():
        torch.testing.assert_close(terms[name].double(), value, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store") / "data.h5"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_in_float32(tio2_path, store, tmp_path, method):
    training = {"max_epochs": 2, "batch_size": 8, "lr": 0.01, "accelerator": "cpu"}
    cfg = tiny_tio2_config(tio2_path, 16, 4, method=method, training=training, **METHODS[method])
    cfg["data"]["store"] = str(store)
    if method == "dropout":
        cfg["model"].update(dropout=0.1, readout_hidden_width=8)
    out = train(cfg, out_dir=tmp_path / method)
    post = load_posterior(out / "posterior.h5")
    assert post.config.dtype == "float32" and post.n_samples == SAMPLES[method]
    weights = [t for n, t in {**post.shared, **post.samples}.items() if n.endswith("weight")]
    assert weights and all(t.dtype == torch.float32 for t in weights)
    assert all(torch.isfinite(t).all() for t in post.samples.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["energy_mae"]) and np.isfinite(metrics["forces_mae"])
    curves = {"map": ["."], "dropout": ["."], "ensemble": ["members/0", "members/1"], "vi": ["map"], "sgmcmc": []}
    for folder in curves[method]:  # every MAP-type training plots its validation curve
        assert (out / folder / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    if method == "vi":  # too short a trace to judge (3 rows): reported as such
        assert json.loads((out / "vi" / "convergence.json").read_text()) == {"rows": 3}


def test_sgmcmc_with_the_noise_head_samples_in_float32(tio2_path, store, tmp_path):
    cfg = tiny_tio2_config(tio2_path, 16, 4, method="sgmcmc", sgmcmc=METHODS["sgmcmc"]["sgmcmc"])
    cfg["data"]["store"] = str(store)
    cfg["model"]["noise"] = "head"
    post = load_posterior(train(cfg, out_dir=tmp_path / "run") / "posterior.h5")
    assert post.config.dtype == "float32" and post.n_samples == 3
    assert all(torch.isfinite(t).all() for t in post.samples.values())
