"""``method: sgmcmc`` end to end: phases, several chains, partial posteriors, priors, resume, divergence."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_tio2_config

import mlip_uq.inference.chains as chain_module
import mlip_uq.inference.sgmcmc as sgmcmc_module
from mlip_uq.inference.priors import select_stochastic
from mlip_uq.model import build_model
from mlip_uq.posterior import load_posterior
from mlip_uq.testing import PosteriorContract
from mlip_uq.train import train

READOUT = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"
# the heads layer: the energy readout and the observation noise's log-factors
HEADS = {READOUT} | {f"model.func.observation_noise.{q}_log_factor" for q in ("force", "energy", "stress")}


def config(tio2_path, store, **sgmcmc):
    # float64: resumed, parallel and warm-started chains are compared with uninterrupted ones bit for bit (or to
    # 1e-12). In float32 a resumed chain differed by up to 2.4e-7 (one or two ulp) in ~10 % of the elements
    # although every state is restored exactly (float32 CPU kernels are reproducible to rounding only);
    # sampling in float32 is tested in tests/unit/test_float32.py
    cfg = tiny_tio2_config(tio2_path, 40, 8, store, method="sgmcmc", sgmcmc={
        "lr": 2e-4, "batch_size": 8, "burnin_steps": 30, "preheat_steps": 6, "n_samples": 4, "thinning": 3,
        "n_chains": 2, "checkpoint_every": 10, "trace_every": 2, **sgmcmc})
    cfg["model"]["dtype"] = "float64"
    return cfg


@pytest.fixture(scope="module")
def full_run(tio2_path, tio2_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("sgmcmc")
    return train(config(tio2_path, tio2_store), out_dir=out)


def test_full_posterior_has_every_sample_of_every_chain(full_run):
    post = load_posterior(full_run / "posterior.h5")
    assert post.method == "sgmcmc" and post.n_samples == 8
    assert post.hyperparameters["sample_chains"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert set(post.samples) == set(select_stochastic(build_model(post.config), "all"))
    w = post.samples[READOUT]
    assert all(not torch.equal(w[i], w[j]) for i in range(8) for j in range(i))
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["n_samples"] == 8 and np.isfinite(metrics["forces_nll"]) and metrics["forces_sharpness"] > 0
    diag = json.loads((full_run / "sgmcmc" / "diagnostics.json").read_text())
    assert diag["n_chains"] == 2 and diag["draws_per_chain"] == 4
    assert {"ess_median", "rhat_max"} <= set(diag["layers"]["heads"])
    assert (full_run / "sgmcmc" / "trace.png").stat().st_size > 5000


def test_posterior_noise_is_fitted_on_the_validation_split_and_the_chain_files_keep_the_sampled_noise(full_run):
    post = load_posterior(full_run / "posterior.h5")
    chain = load_posterior(full_run / "sgmcmc" / "samples_chain0.h5")
    force_factor = "model.func.observation_noise.force_log_factor"
    for name, values in chain.samples.items():
        if name == force_factor:  # every sample's force noise moved to its held-out value
            assert all(not torch.equal(post.samples[name][k], values[k]) for k in range(4))
        elif "observation_noise" not in name:
            assert torch.equal(post.samples[name][:4], values), name


def test_trace_records_the_phases_and_temperature_ramp(full_run):
    import csv

    rows = list(csv.DictReader(open(full_run / "sgmcmc" / "trace_chain0.csv")))
    phases = [r["phase"] for r in rows]
    assert phases[0] == "burnin" and "preheat" in phases and phases[-1] == "sampling"
    temps = [float(r["temperature"]) for r in rows]
    assert all(t == 0 for t, p in zip(temps, phases) if p == "burnin")
    assert temps[-1] == 1.0 and all(0 < t <= 1 for t, p in zip(temps, phases) if p == "preheat")
    burn = [float(r["median_step_size"]) for r in rows if r["phase"] != "burnin"]
    assert len(set(burn)) == 1  # preconditioner frozen after burn-in: effective step sizes constant


def test_killed_run_resumes_to_the_same_samples(tio2_path, tio2_store, full_run, tmp_path, monkeypatch):
    original = chain_module.Chain.save
    calls = {"n": 0}

    def save_then_die(self, path=None):
        original(self, path)
        calls["n"] += 1
        if calls["n"] == 7:  # chain 0 killed at its 7th checkpoint: after its 3rd sample (step 45 of 48)
            raise KeyboardInterrupt

    monkeypatch.setattr(chain_module.Chain, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config(tio2_path, tio2_store), out_dir=tmp_path)
    monkeypatch.undo()
    # killed while sampling: the draws so far are in the chain files, and no posterior.h5 was written that
    # differs from the finished run's
    assert not (tmp_path / "posterior.h5").exists()
    assert 0 < load_posterior(tmp_path / "sgmcmc" / "samples_chain0.h5").n_samples < 4
    train(config(tio2_path, tio2_store), out_dir=tmp_path, resume=True)
    resumed, reference = load_posterior(tmp_path / "posterior.h5"), load_posterior(full_run / "posterior.h5")
    assert resumed.hyperparameters["sample_chains"] == reference.hyperparameters["sample_chains"]
    for name, t in reference.samples.items():
        torch.testing.assert_close(resumed.samples[name], t, rtol=0, atol=0)


def test_partially_bayesian_run_samples_only_the_heads_and_shares_the_rest(tio2_path, tio2_store, tmp_path):
    out = train(config(tio2_path, tio2_store, stochastic={"last_layers": 1}), out_dir=tmp_path)
    post = load_posterior(out / "posterior.h5")
    assert set(post.samples) == HEADS
    assert "model.func.layer0_convnet.conv.linear_1.weight" in post.shared
    assert post.n_samples == 8 and post.hyperparameters["partial"]
    w = post.samples[READOUT]
    assert not torch.equal(w[0], w[4])  # chains differ in the stochastic part only


def test_transfer_prior_is_centred_on_pretrained_weights(tio2_path, tio2_store, full_run, tmp_path, monkeypatch):
    source = load_posterior(full_run / "posterior.h5")
    seen = {}
    original = sgmcmc_module.prior_from_spec

    def spy(spec, model, stochastic):
        prior = original(spec, model, stochastic)
        seen["prior"] = prior
        return prior

    monkeypatch.setattr(sgmcmc_module, "prior_from_spec", spy)
    cfg = config(tio2_path, tio2_store, n_chains=1, prior={"scale": 0.05, "center": str(full_run / "posterior.h5")},
                 init=str(full_run / "posterior.h5"))
    train(cfg, out_dir=tmp_path)
    prior = seen["prior"]
    samples = source.samples[READOUT]
    expected = (source.weights.to(samples.dtype)[:, None, None] * samples).sum(0)  # in the parameters' dtype
    torch.testing.assert_close(prior.centers[READOUT], expected)
    assert set(prior.centers) == set(source.samples)


def test_init_map_trains_a_map_model_first_and_starts_and_centres_there(tio2_path, tio2_store, tmp_path,
                                                                        monkeypatch):
    seen = {}
    original_prior, original_job = sgmcmc_module.prior_from_spec, sgmcmc_module._make_job

    def prior_spy(spec, model, stochastic):
        seen["prior"] = original_prior(spec, model, stochastic)
        return seen["prior"]

    def job_spy(*args, **kwargs):
        seen["job"] = original_job(*args, **kwargs)
        return seen["job"]

    monkeypatch.setattr(sgmcmc_module, "prior_from_spec", prior_spy)
    monkeypatch.setattr(sgmcmc_module, "_make_job", job_spy)
    cfg = config(tio2_path, tio2_store, n_chains=1, init="map", prior={"scale": 0.05, "center": "map"})
    cfg["training"] = {"max_epochs": 3, "batch_size": 8, "lr": 0.01}
    train(cfg, out_dir=tmp_path)
    epochs = [int(row.split(",")[0]) for row in (tmp_path / "map" / "logs" / "metrics.csv").read_text().split()[1:]]
    assert epochs == [0, 1, 2]  # the MAP phase: 3 epochs, validated
    map_state = torch.load(tmp_path / "map" / "final.pt", weights_only=True)
    fresh = build_model(load_posterior(tmp_path / "posterior.h5").config)
    # every chain starts at the MAP weights (not a fresh initialisation) and the prior is centred on them
    assert set(seen["job"].start) == set(seen["prior"].centers) == {n for n, _ in fresh.named_parameters()}
    fresh = fresh.state_dict()
    for name, value in seen["job"].start.items():
        assert torch.equal(value, map_state[name]) and torch.equal(seen["prior"].centers[name], map_state[name])
    assert not torch.equal(map_state[READOUT], fresh[READOUT])
    assert load_posterior(tmp_path / "posterior.h5").hyperparameters["init"] == str(tmp_path / "map" / "final.pt")


def test_init_map_needs_no_file_and_a_typo_is_still_a_path(tio2_path, tio2_store):
    from mlip_uq.config import ConfigError, resolve_method_paths
    from mlip_uq.inference.sgmcmc import SGMCMCSettings

    cfg = {"sgmcmc": {"init": "map", "prior": {"center": "maps"}}}
    resolve_method_paths(cfg, tio2_path.parent)
    assert cfg["sgmcmc"]["init"] == "map" and cfg["sgmcmc"]["prior"]["center"] == str(tio2_path.parent / "maps")
    with pytest.raises(ConfigError, match="sgmcmc.training"):
        SGMCMCSettings.from_dict({"sgmcmc": {"init": "map", "training": {}}})


def test_a_diverging_chain_stops_and_keeps_only_its_finite_samples(tio2_path, tio2_store, tmp_path, monkeypatch,
                                                                   caplog):
    # one run, both ways a chain diverges (the chains run one after the other, one likelihood call per step and
    # one more checking each sample, drawn at steps 38, 41, 44, 47):
    # - chain 0's first sample predicts inf (call 40: steps 0-38, then the check of the step-38 sample): the sample
    #   is not kept and the chain stops with none;
    # - chain 1's step 42 is NaN (its call 45: steps 0-41 and the checks at 38 and 41; 40 + 45 = 85): the chain
    #   stops and keeps the two samples drawn before it
    original = chain_module.neg_log_likelihood
    calls = {"n": 0}
    poison = {40: float("inf"), 85: float("nan")}

    def poisoned(out, batch, weights=None):
        calls["n"] += 1
        nll = original(out, batch, weights)
        return nll * poison[calls["n"]] if calls["n"] in poison else nll

    monkeypatch.setattr(chain_module, "neg_log_likelihood", poisoned)
    train(config(tio2_path, tio2_store), out_dir=tmp_path)
    chains = load_posterior(tmp_path / "posterior.h5").hyperparameters["sample_chains"]
    assert chains == [1, 1]
    assert "chain 0 diverged at step 38 (its sample predicts inf)" in caplog.text
    assert "chain 1 diverged at step 42" in caplog.text


def test_bad_sgmcmc_options_are_reported(tio2_path, tio2_store, tmp_path):
    with pytest.raises(ValueError, match="last_layers must be between 1 and"):
        train(config(tio2_path, tio2_store, stochastic={"last_layers": 99}), out_dir=tmp_path)
    with pytest.raises(ValueError, match="match no parameter"):
        train(config(tio2_path, tio2_store, stochastic={"patterns": ["*nothing*"]}), out_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="unknown sgmcmc.prior option"):
        train(config(tio2_path, tio2_store, prior={"sigma": 1.0}), out_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"unknown sgmcmc option\(s\) \['step_size'\]"):
        train(config(tio2_path, tio2_store, step_size=1.0), out_dir=tmp_path / "e")
    with pytest.raises(ValueError, match="sgmcmc.noise: the observation noise is part of the model"):
        train(config(tio2_path, tio2_store, noise={"force": 0.1}), out_dir=tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(config(tio2_path, tio2_store, prior={"center": str(tmp_path / "none.h5")}), out_dir=tmp_path / "d")


def test_chains_in_parallel_processes_draw_the_samples_of_sequential_chains(tio2_path, tio2_store, full_run, tmp_path):
    # two chains in two processes (Lightning Fabric, ddp_spawn): a chain's samples do not depend on where it ran.
    # A spawned process runs torch with cpu_count // 2 threads, this one with the default (one in a pytest-xdist
    # worker): threaded CPU kernels may sum in another order, so the samples agree to float64 round-off (1e-12
    # relative), not necessarily bitwise.
    train(config(tio2_path, tio2_store, n_processes=2, accelerator="cpu"), out_dir=tmp_path)
    parallel, sequential = load_posterior(tmp_path / "posterior.h5"), load_posterior(full_run / "posterior.h5")
    assert parallel.hyperparameters["sample_chains"] == sequential.hyperparameters["sample_chains"]
    for name, t in sequential.samples.items():
        torch.testing.assert_close(parallel.samples[name], t, rtol=1e-12, atol=1e-12 * float(t.abs().max()))


def test_a_warm_start_can_re_adapt_the_preconditioner_to_a_label_with_large_forces(tio2_path, tio2_store, full_run,
                                                                                     tmp_path, monkeypatch):
    import csv
    import shutil

    from nequip.data import AtomicDataDict

    from mlip_uq.data import FrameStore
    from mlip_uq.inference.sgmcmc import SGMCMCSettings, continue_sgmcmc

    first = load_posterior(full_run / "posterior.h5")
    splits = json.loads((full_run / "splits.json").read_text())
    grown = FrameStore.open(tio2_store).graphs(splits["train"] + splits["val"])
    grown[0] = {**grown[0], AtomicDataDict.FORCE_KEY: 30 * grown[0][AtomicDataDict.FORCE_KEY]}  # an outlier label
    settings = SGMCMCSettings.from_dict(config(tio2_path, tio2_store))

    before = preconditioner(full_run)
    run = tmp_path / "readapt"
    shutil.copytree(full_run, run)
    continue_sgmcmc(first.config, grown, settings, run, n_steps=2, n_samples=1, readapt_steps=4)
    after = preconditioner(run)
    assert bool((after <= before).all()) and bool((after < 0.5 * before).any())  # it only shrinks, and did
    rows = [r for r in csv.DictReader(open(run / "sgmcmc" / "trace_chain0.csv")) if int(r["step"]) >= 48]
    # trace rows every 2nd step: steps 48-51 re-adapt (noise-free), 52-53 settle, then the sample
    assert [(r["phase"], float(r["temperature"])) for r in rows] == \
        [("burnin", 0.0)] * 2 + [("settle", 1.0)] + [("sampling", 1.0)] * 2
    # killed at the checkpoint of step 50, inside the re-adaptation: resumed, it adapts on to the same result
    killed = tmp_path / "killed"
    shutil.copytree(full_run, killed)
    original = chain_module.Chain.save

    def save_then_die(self, path=None):
        original(self, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(chain_module.Chain, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        continue_sgmcmc(first.config, grown, settings, killed, n_steps=2, n_samples=1, readapt_steps=4)
    monkeypatch.undo()
    assert torch.load(killed / "sgmcmc" / "chain0.ckpt", weights_only=True)["step"] == 50
    continue_sgmcmc(first.config, grown, settings, killed, n_steps=2, n_samples=1, readapt_steps=4)
    assert torch.equal(preconditioner(killed), after)


def test_cyclical_step_sizes_sample_at_the_end_of_each_cycle(tio2_path, tio2_store, tmp_path):
    import csv

    out = train(config(tio2_path, tio2_store, n_chains=1, preheat_steps=0, n_samples=4, thinning=2, cycle_steps=8,
                       exploration_fraction=0.5, trace_every=1), out_dir=tmp_path)
    post = load_posterior(out / "posterior.h5")
    assert post.n_samples == 4
    rows = list(csv.DictReader(open(out / "sgmcmc" / "trace_chain0.csv")))
    cycle = [r for r in rows if 30 <= int(r["step"]) < 38]
    assert [r["phase"] for r in cycle] == ["exploration"] * 4 + ["sampling"] * 4
    assert [float(r["temperature"]) for r in cycle] == [0.0] * 4 + [1.0] * 4
    steps = [float(r["median_step_size"]) for r in cycle]
    assert all(a > b for a, b in zip(steps, steps[1:]))  # cosine decay within the cycle
    assert float(rows[38]["median_step_size"]) == pytest.approx(steps[0])  # restart


def preconditioner(run):
    """Chain 0's preconditioner P (all parameters, flattened) in its checkpoint, which must be frozen."""
    state = torch.load(run / "sgmcmc" / "chain0.ckpt", weights_only=True)["optimizer"]
    assert not any(g["adapt_preconditioner"] for g in state["param_groups"])
    return torch.cat([s["precond"].flatten() for s in state["state"].values()])


def test_warm_start_continues_the_chains_on_more_data(tio2_path, tio2_store, full_run, tmp_path, monkeypatch):
    import shutil

    from mlip_uq.data import FrameStore
    from mlip_uq.inference.sgmcmc import SGMCMCSettings, continue_sgmcmc

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    first = load_posterior(run / "posterior.h5")
    splits = json.loads((run / "splits.json").read_text())
    grown = FrameStore.open(tio2_store).graphs(splits["train"] + splits["val"])
    settings = SGMCMCSettings.from_dict(config(tio2_path, tio2_store))
    post = continue_sgmcmc(first.config, grown, settings, run, n_steps=5, n_samples=2)
    assert post.n_samples == 4 and post.hyperparameters["sample_chains"] == [0, 0, 1, 1]
    assert post.hyperparameters["round"] == 1
    assert not torch.equal(post.samples[READOUT][0], first.samples[READOUT][3])
    chain0 = torch.load(run / "sgmcmc" / "chain0.ckpt", weights_only=True)
    assert chain0["step"] == 48 + 5 + 2 * 3 and chain0["round"] == 1
    assert all(g["num_data"] == len(grown) for g in chain0["optimizer"]["param_groups"])
    assert torch.equal(preconditioner(run), preconditioner(full_run))  # the first burn-in's, frozen
    # idempotent: the same continuation again draws nothing and returns the same posterior
    monkeypatch.setattr(sgmcmc_module, "run_chain", lambda *a, **k: pytest.fail("sampled again"))
    again = continue_sgmcmc(first.config, grown, settings, run, n_steps=5, n_samples=2)
    torch.testing.assert_close(again.samples[READOUT], post.samples[READOUT], rtol=0, atol=0)
    monkeypatch.undo()

    # a continuation killed half-way is resumed by calling it again, to the same samples
    killed = tmp_path / "killed"
    shutil.copytree(full_run, killed)
    original = chain_module.Chain.save
    calls = {"n": 0}

    def save_then_die(self, path=None):
        original(self, path)
        calls["n"] += 1
        if calls["n"] == 2:  # chain 0 after the first sample of the round (checkpoints at step 50, 56)
            raise KeyboardInterrupt

    monkeypatch.setattr(chain_module.Chain, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        continue_sgmcmc(first.config, grown, settings, killed, n_steps=5, n_samples=2)
    monkeypatch.undo()
    resumed = continue_sgmcmc(first.config, grown, settings, killed, n_steps=5, n_samples=2)
    for name, t in post.samples.items():
        torch.testing.assert_close(resumed.samples[name], t, rtol=0, atol=0)


class TestSGMCMCPosterior(PosteriorContract):
    """The posterior contract (:mod:`mlip_uq.testing`) for method sgmcmc (two chains, fully Bayesian)."""

    @pytest.fixture
    def contract_posterior(self, full_run):
        return load_posterior(full_run / "posterior.h5")


def starts_config(tio2_path, store):
    cfg = config(tio2_path, store, n_chains=1, n_samples=3, n_starts=2, init="map", prior={"center": "map"})
    cfg["training"] = {"max_epochs": 2, "batch_size": 8, "lr": 0.01}
    return cfg


@pytest.fixture(scope="module")
def starts_run(tio2_path, tio2_store, tmp_path_factory):
    return train(starts_config(tio2_path, tio2_store), out_dir=tmp_path_factory.mktemp("starts"))


def test_several_starts_pool_the_draws_of_independent_map_fits(starts_run):
    from mlip_uq.inference.starts import DRAWS, pool_starts

    tmp_path = starts_run
    starts = tmp_path / "starts"
    fits = [torch.load(starts / "members" / str(s) / "final.pt", weights_only=True) for s in (0, 1)]
    assert not torch.equal(fits[0][READOUT], fits[1][READOUT])  # independent fits: seeds 0 and 1
    parts = [load_posterior(starts / str(s) / DRAWS) for s in (0, 1)]
    for part, fit in zip(parts, fits):
        assert part.hyperparameters["init"] == part.hyperparameters["prior"]["center"]
        assert torch.linalg.norm(part.samples[READOUT][0] - fit[READOUT]) < torch.linalg.norm(
            part.samples[READOUT][0] - fits[1 - parts.index(part)][READOUT])  # each start samples near its fit
    post = load_posterior(tmp_path / "posterior.h5")
    assert post.hyperparameters["sample_starts"] == [0, 0, 0, 1, 1, 1]
    assert post.hyperparameters["sample_chains"] == [0, 0, 0, 1, 1, 1]
    assert post.n_samples == 6 and torch.allclose(post.weights, torch.full((6,), 1 / 6, dtype=torch.float64))
    pooled = pool_starts(parts)
    for name, t in pooled.samples.items():
        if "observation_noise" not in name:  # the noise of the final posterior is fitted on the validation set
            torch.testing.assert_close(post.samples[name], t, rtol=0, atol=0)
    summary = json.loads((starts / "starts.json").read_text())
    assert [s["n_draws"] for s in summary["starts"]] == [3, 3]
    assert all(s["fit_seconds"] > 0 and s["sampling_seconds"] > 0 for s in summary["starts"])
    assert 0 < summary["validation"]["between_share"] <= 1
    assert 0 < summary["validation"]["epistemic_share"] < 1


def test_several_starts_need_a_start_per_basin():
    from mlip_uq.config import ConfigError
    from mlip_uq.inference.sgmcmc import SGMCMCSettings

    with pytest.raises(ConfigError, match="one basin"):
        SGMCMCSettings.from_dict({"sgmcmc": {"n_starts": 3, "init": "model.h5"}})
    assert SGMCMCSettings.from_dict({"sgmcmc": {"n_starts": 3}}).n_starts == 3  # fresh starts
    with pytest.raises(ConfigError, match="needs sgmcmc.init: map"):
        SGMCMCSettings.from_dict({"sgmcmc": {"n_starts": 3, "prior": {"center": "map"}}})


def test_active_learning_continues_the_chains_of_every_start(tio2_path, tio2_store, starts_run, tmp_path):
    import shutil

    from mlip_uq.data import FrameStore
    from mlip_uq.inference import FitContext
    from mlip_uq.inference.sgmcmc import SGMCMCSettings, UpdateSettings, update

    run = tmp_path / "run"
    shutil.copytree(starts_run, run)
    first = load_posterior(run / "posterior.h5")
    splits = json.loads((run / "splits.json").read_text())
    store = FrameStore.open(tio2_store)
    context = FitContext(model_config=first.config, train=store.graphs(splits["train"] + splits["test"][:4]),
                         val=store.graphs(splits["val"]),
                         settings=SGMCMCSettings.from_dict(starts_config(tio2_path, tio2_store)), out_dir=run)
    path = update(context, UpdateSettings(settle_steps=3, n_samples=2), index=1)
    post = load_posterior(path)
    assert post.hyperparameters["sample_starts"] == [0, 0, 1, 1]
    for s in (0, 1):  # every start's chain went on from its own state, on the grown set
        chain = torch.load(run / "starts" / str(s) / "sgmcmc" / "chain0.ckpt", weights_only=True)
        assert chain["round"] == 1 and chain["step"] == 45 + 3 + 2 * 3
        assert all(g["num_data"] == len(context.train) + len(context.val) for g in chain["optimizer"]["param_groups"])
    assert not torch.equal(post.samples[READOUT][0], first.samples[READOUT][2])


def test_a_start_that_diverges_in_an_update_is_left_out_and_the_others_go_on(tio2_path, tio2_store, starts_run,
                                                                             tmp_path, monkeypatch):
    import shutil

    from mlip_uq.data import FrameStore
    from mlip_uq.inference import FitContext
    from mlip_uq.inference import sgmcmc as sgmcmc_module
    from mlip_uq.inference.chains import NoDrawsError
    from mlip_uq.inference.sgmcmc import SGMCMCSettings, UpdateSettings, update
    from mlip_uq.inference.starts import DIVERGED

    run = tmp_path / "run"
    shutil.copytree(starts_run, run)
    splits = json.loads((run / "splits.json").read_text())
    store = FrameStore.open(tio2_store)
    original, continued = sgmcmc_module.continue_sgmcmc, []

    def start0_diverges(config, train, settings, out_dir, **kwargs):
        continued.append(Path(out_dir).name)
        if Path(out_dir).name == "0":
            raise NoDrawsError("every chain diverged")
        return original(config, train, settings, out_dir, **kwargs)

    monkeypatch.setattr(sgmcmc_module, "continue_sgmcmc", start0_diverges)
    settings = SGMCMCSettings.from_dict(starts_config(tio2_path, tio2_store))
    first = load_posterior(run / "posterior.h5")
    for index, extra in ((1, 4), (2, 6)):
        context = FitContext(model_config=first.config, train=store.graphs(splits["train"] + splits["test"][:extra]),
                             val=store.graphs(splits["val"]), settings=settings, out_dir=run)
        post = load_posterior(update(context, UpdateSettings(settle_steps=3, n_samples=2), index=index))
        assert post.hyperparameters["sample_starts"] == [0, 0]  # start 1's draws alone (renumbered from 0)
        assert torch.allclose(post.weights, torch.full((2,), 0.5, dtype=torch.float64))
    assert continued == ["0", "1", "1"]  # the diverged start is not continued again
    assert json.loads((run / "starts" / "0" / DIVERGED).read_text())["num_data"] == len(splits["train"]) + 4 + len(
        splits["val"])
    (run / "starts" / "1" / DIVERGED).write_text("{}")
    with pytest.raises(NoDrawsError, match="every start diverged"):
        context = FitContext(model_config=first.config, train=store.graphs(splits["train"] + splits["test"][:8]),
                             val=store.graphs(splits["val"]), settings=settings, out_dir=run)
        update(context, UpdateSettings(settle_steps=3, n_samples=2), index=3)
