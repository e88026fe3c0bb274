"""``mlip-uq train`` with ``method: ensemble | vi | dropout`` end to end on a few TiO2 structures; VI resume."""

import copy
import json

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_tio2_config

import mlip_uq.inference.vi as vi
from mlip_uq.cli import main
from mlip_uq.posterior import load_posterior
from mlip_uq.testing import PosteriorContract
from mlip_uq.train import train

READOUT = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"
# the heads layer: the energy readout and the observation noise's log-factors
HEADS = {READOUT} | {f"model.func.observation_noise.{q}_log_factor" for q in ("force", "energy", "stress")}
TRAINING = {"max_epochs": 2, "batch_size": 8, "lr": 0.01, "loss_weights": {"energy": 1.0, "forces": 1.0},
            "accelerator": "cpu"}
VI = {"steps": 24, "batch_size": 8, "lr": 2e-3, "n_samples": 4, "checkpoint_every": 10, "trace_every": 2,
      "init": "map"}  # a MAP phase first, in map/
SECTIONS = {
    "ensemble": {"ensemble": {"n_members": 3}},
    "vi": {"vi": VI},
    "dropout": {"dropout": {"n_samples": 5}},
}
SAMPLES = {"ensemble": 3, "vi": 4, "dropout": 5}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One prepared data store for every run of this module (the frames are read and neighbour-listed once)."""
    return tmp_path_factory.mktemp("store") / "data.h5"


def config(tio2_path, store, method, **sections):
    cfg = copy.deepcopy(tiny_tio2_config(tio2_path, 32, 8, method=method, training=TRAINING,
                                         **{**SECTIONS[method], **sections}))
    cfg["data"]["store"] = str(store)
    if method == "dropout":
        cfg["model"]["dropout"] = 0.1
        cfg["model"]["readout_hidden_width"] = 8
    return cfg


@pytest.fixture(scope="module")
def runs(tio2_path, store, tmp_path_factory):
    """One run per method through the command line."""
    out = {}
    for method in SECTIONS:
        folder = tmp_path_factory.mktemp(method)
        path = folder / "config.in.yaml"
        path.write_text(yaml.safe_dump(config(tio2_path, store, method)))
        assert main(["train", str(path), "--out", str(folder / "run")]) == 0
        out[method] = folder / "run"
    return out


@pytest.mark.parametrize("method", list(SECTIONS))
def test_train_writes_a_posterior_of_k_samples_and_its_metrics(runs, method):
    post = load_posterior(runs[method] / "posterior.h5")
    assert post.method == method and post.n_samples == SAMPLES[method]
    metrics = json.loads((runs[method] / "metrics.json").read_text())
    assert metrics["n_samples"] == SAMPLES[method] and metrics["n_structures"] == 8
    for key in ("energy_nll", "forces_nll", "forces_miscal_area"):
        assert np.isfinite(metrics[key]), key
    assert metrics["forces_sharpness"] > 0
    flat = torch.cat([t.flatten(1) for t in post.samples.values()], dim=1)
    assert not torch.equal(flat[0], flat[1])


def test_each_method_keeps_its_own_files(runs):
    assert sorted(p.name for p in (runs["ensemble"] / "members").iterdir()) == ["0", "1", "2"]
    assert (runs["vi"] / "map" / "final.pt").is_file() and (runs["vi"] / "vi" / "vi.ckpt").is_file()
    rows = (runs["vi"] / "vi" / "trace.csv").read_text().splitlines()
    assert rows[0] == "step,neg_elbo,nll,kl,median_scale" and len(rows) == 1 + 12
    with h5py.File(runs["vi"] / "posterior.h5", "r") as f:
        assert set(f["vi/mean"]) == set(f["samples"]) == set(f["vi/scale"])
    post = load_posterior(runs["dropout"] / "posterior.h5")
    assert post.hyperparameters["rate"] == 0.1 and post.config.dropout == 0.1
    assert len(post.samples) == 3  # two radial networks and the readout's hidden layer


def test_killed_vi_run_resumes_to_the_same_result(runs, tio2_path, store, tmp_path, monkeypatch):
    # both runs start from the means of the module's VI run (its MAP phase), so only the VI phase is compared;
    # with init_scale fisher the resumed run takes its scales from the checkpoint, not from a new Fisher estimate
    start = str(runs["vi"] / "map" / "final.pt")
    cfg = config(tio2_path, store, "vi", vi={**VI, "init": start, "init_scale": "fisher"})
    # float64: bit-for-bit equality is the claim. In float32 the resumed run differed in 12 of 512 elements by one
    # ulp (1.5e-8), although the state round trip is exact: float32 CPU kernels may take other code paths for
    # other memory alignments, so float32 runs are reproducible to rounding only
    cfg["model"]["dtype"] = "float64"
    reference = train(cfg, out_dir=tmp_path / "straight")
    original = vi.vi_step

    def dies_at_step_15(state, *args, **kwargs):
        if state.step == 15:
            raise KeyboardInterrupt
        return original(state, *args, **kwargs)

    monkeypatch.setattr(vi, "vi_step", dies_at_step_15)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_dir=tmp_path / "killed")
    monkeypatch.undo()
    assert torch.load(tmp_path / "killed" / "vi" / "vi.ckpt", weights_only=True)["step"] == 10
    train(cfg, out_dir=tmp_path / "killed", resume=True)
    a, b = load_posterior(reference / "posterior.h5"), load_posterior(tmp_path / "killed" / "posterior.h5")
    for name, t in a.samples.items():
        torch.testing.assert_close(b.samples[name], t, rtol=0, atol=0)
    (ma, sa), (mb, sb) = vi.load_gaussian(reference / "posterior.h5"), vi.load_gaussian(tmp_path / "killed" / "posterior.h5")
    assert all(torch.equal(ma[n], mb[n]) and torch.equal(sa[n], sb[n]) for n in ma)
    assert (tmp_path / "killed" / "vi" / "trace.csv").read_text() == (reference / "vi" / "trace.csv").read_text()


def test_partially_bayesian_vi_varies_only_the_heads(runs, tio2_path, store, tmp_path):
    cfg = config(tio2_path, store, "vi", vi={**VI, "stochastic": {"last_layers": 1}, "init": str(runs["vi"] / "map" / "final.pt")})
    post = load_posterior(train(cfg, out_dir=tmp_path) / "posterior.h5")
    assert set(post.samples) == HEADS and post.hyperparameters["partial"]
    start = torch.load(runs["vi"] / "map" / "final.pt", weights_only=True)
    assert torch.equal(post.shared["model.func.layer0_convnet.conv.linear_1.weight"],
                       start["model.func.layer0_convnet.conv.linear_1.weight"])


def test_vi_with_init_null_starts_from_a_fresh_initialisation(tio2_path, store, tmp_path):
    # as SG-MCMC's init: null; the MAP phase is init: map (the module's VI run)
    cfg = config(tio2_path, store, "vi", vi={**VI, "init": None, "steps": 4})
    out = train(cfg, out_dir=tmp_path)
    assert not (out / "map").exists()
    post = load_posterior(out / "posterior.h5")
    assert post.hyperparameters["init"] is None and post.hyperparameters["training"] is None


def test_mean_variance_ensemble_reports_aleatoric_forces_uncertainty(tio2_path, store, tmp_path):
    cfg = config(tio2_path, store, "ensemble", ensemble={"n_members": 2})
    cfg["model"]["noise"] = "head"
    post = load_posterior(train(cfg, out_dir=tmp_path) / "posterior.h5")
    assert "model.func.noise_head.mlp_module.mlp.0.weight" in post.samples and post.n_samples == 2
    factors = post.samples["model.func.observation_noise.force_log_factor"]
    assert not torch.equal(factors[0], factors[1])  # each member learned its own noise
    assert np.isfinite(json.loads((tmp_path / "metrics.json").read_text())["forces_nll"])


@pytest.mark.parametrize("method, change, message", [
    ("dropout", {}, "method dropout needs model.dropout > 0"),
    ("vi", {"model.dropout": 0.1}, "model.dropout is for methods dropout, map and ensemble, not vi"),
    ("vi", {"vi.noise": {"forces": 0.1}}, "vi.noise: the observation noise is part of the model"),
    ("vi", {"model.noise": "homoscedastic"}, r"noise must be one of \['learned', 'head', 'fixed'\]"),
    ("ensemble", {"ensemble.training": {"lr": 0.1}}, "the members' training settings go in the training section"),
    ("ensemble", {"ensemble.members": 3}, r"unknown ensemble option\(s\) \['members'\]"),
    ("vi", {"vi.mc_sample": 2}, r"unknown vi option\(s\) \['mc_sample'\]"),
    ("vi", {"vi.init_scale": 0.0}, "vi.init_scale must be a number > 0 or 'fisher', got 0.0"),
    ("vi", {"vi.init_scale": "laplace"}, "vi.init_scale must be a number > 0 or 'fisher', got 'laplace'"),
    ("vi", {"vi.scale_lr": 0.0}, r"vi.scale_lr must be > 0 or null \(the means' lr\), got 0.0"),
])
def test_bad_method_settings_are_reported_before_the_data_are_read(tio2_path, tmp_path, method, change, message):
    cfg = config(tio2_path, tmp_path / "data.h5", method)
    if method == "dropout":
        cfg["model"].pop("dropout")
    for key, value in change.items():
        *sections, option = key.split(".")
        node = cfg
        for section in sections:
            node = node.setdefault(section, {})
        node[option] = value
    with pytest.raises(ValueError, match=message):
        train(cfg, out_dir=tmp_path)
    assert not (tmp_path / "data.h5").exists()


class TestEnsemblePosterior(PosteriorContract):
    """The posterior contract (:mod:`mlip_uq.testing`) for method ensemble."""

    @pytest.fixture
    def contract_posterior(self, runs):
        return load_posterior(runs["ensemble"] / "posterior.h5")


class TestVIPosterior(PosteriorContract):
    """The posterior contract (:mod:`mlip_uq.testing`) for method vi."""

    @pytest.fixture
    def contract_posterior(self, runs):
        return load_posterior(runs["vi"] / "posterior.h5")


class TestDropoutPosterior(PosteriorContract):
    """The posterior contract (:mod:`mlip_uq.testing`) for method dropout."""

    @pytest.fixture
    def contract_posterior(self, runs):
        return load_posterior(runs["dropout"] / "posterior.h5")
