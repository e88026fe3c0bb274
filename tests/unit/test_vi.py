"""Mean-field VI core on Bayesian linear regression, its state, KL, sampling and the posterior file."""

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_model_config

from mlip_uq.inference.priors import GaussianPrior
from mlip_uq.inference.vi import (
    fisher_scales,
    init_vi,
    kl_divergence,
    load_gaussian,
    posterior_from_gaussian,
    report_convergence,
    resample,
    sample_gaussian,
    save_vi_posterior,
    softplus_inverse,
    vi_step,
)
from mlip_uq.model import ModelConfig, build_model
from mlip_uq.posterior import Posterior, PosteriorFileError, load_posterior

D, N, NOISE, PRIOR = 3, 40, 0.5, 1.0


class Linear(torch.nn.Module):
    """y = x · w, the model VI runs on (its forward takes the batch, as the VI core expects)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))

    def forward(self, batch):
        return batch["x"] @ self.w


def nll(out, batch):
    return 0.5 * (out - batch["y"]) ** 2 / NOISE**2


@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(1)
    # correlated inputs, so that the mean-field variances 1/Λ_ii differ from the marginal variances (Λ⁻¹)_ii
    mix = torch.tensor([[1.0, 0.8, 0.0], [0.0, 0.6, 0.5], [0.0, 0.0, 0.7]], dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64) @ mix
    y = x @ torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) + NOISE * torch.randn(N, generator=g, dtype=torch.float64)
    precision = x.T @ x / NOISE**2 + torch.eye(D, dtype=torch.float64) / PRIOR**2
    mean = torch.linalg.solve(precision, x.T @ y / NOISE**2)
    return {"x": x, "y": y}, precision, mean


def test_vi_recovers_the_exact_posterior_mean_and_the_mean_field_variances(regression):
    batch, precision, mean = regression
    model, prior = Linear(), GaussianPrior(scale=PRIOR)
    state = init_vi({"w": model.w.detach()}, init_scale=0.1, lr=0.05, seed=0)
    steps = 2000
    for i in range(steps):
        for group in state.optimizer.param_groups:  # linear decay, so the iterates settle at the optimum
            group["lr"] = 0.05 * (1 - i / steps) + 1e-4
        vi_step(state, model, batch, nll, N, prior, mc_samples=8)
    mf_var = 1 / torch.diag(precision)
    marginal_var = torch.diag(torch.linalg.inv(precision))
    assert torch.all(marginal_var > 1.4 * mf_var)  # the two theories differ far beyond the tolerance below
    mu, var = state.means["w"].detach(), state.scales()["w"].detach() ** 2
    assert torch.all((mu - mean).abs() < 0.05 * mf_var.sqrt()), (mu, mean)
    torch.testing.assert_close(var, mf_var, rtol=0.08, atol=0)
    assert state.step == steps


def test_fisher_scales_are_the_mean_field_variances_of_a_linear_gaussian_model(regression):
    # at the posterior mean the per-datum gradient is x_i r / NOISE², so N·F_ii + 1/s² = Σ x_i² r² / NOISE⁴ + 1/s²,
    # which is Λ_ii = Σ x_i² / NOISE² + 1/s² up to the scatter of r² about NOISE²
    batch, precision, mean = regression
    model, prior = Linear(), GaussianPrior(scale=PRIOR)
    singles = ({"x": batch["x"][i : i + 1], "y": batch["y"][i : i + 1]} for i in range(N))
    scales = fisher_scales(model, {"w": mean}, singles, [(1.0, nll)], N, prior)
    mf_std = torch.diag(precision).rsqrt()
    torch.testing.assert_close(scales["w"], mf_std, rtol=0.25, atol=0)
    assert torch.all(scales["w"] < 0.5 * PRIOR)  # far from the prior scale: the data constrain every weight
    # a weight the data do not see starts at the prior scale
    unseen = fisher_scales(model, {"w": mean}, [{"x": torch.zeros(1, D, dtype=torch.float64), "y": batch["y"][:1]}],
                           [(1.0, nll)], N, prior)
    torch.testing.assert_close(unseen["w"], torch.full((D,), PRIOR, dtype=torch.float64))
    state = init_vi({"w": mean}, scales, lr=0.01, seed=0)
    torch.testing.assert_close(state.scales()["w"], scales["w"])


def test_the_first_adam_step_moves_means_by_lr_and_raw_scales_by_scale_lr(regression):
    batch, _, _ = regression
    state = init_vi({"w": torch.zeros(D, dtype=torch.float64)}, 0.1, lr=0.01, seed=0, scale_lr=0.2)
    means, raw = state.means["w"].detach().clone(), state.raw_scales["w"].detach().clone()
    vi_step(state, Linear(), batch, nll, N, GaussianPrior(scale=PRIOR))
    # Adam's first step is lr · g / (|g| + eps): one learning rate per group, whatever the gradient's size
    torch.testing.assert_close((state.means["w"] - means).abs(), torch.full((D,), 0.01, dtype=torch.float64))
    torch.testing.assert_close((state.raw_scales["w"] - raw).abs(), torch.full((D,), 0.2, dtype=torch.float64))


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = {"a": torch.randn(4, generator=g, dtype=torch.float64), "b": torch.randn(2, 3, generator=g, dtype=torch.float64)}
    sigma = {n: 0.1 + torch.rand(t.shape, generator=g, dtype=torch.float64) for n, t in mu.items()}
    prior = GaussianPrior(scale=0.7, centers={"b": torch.full((2, 3), 0.3, dtype=torch.float64)})
    expected = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(mu[n], sigma[n]),
            torch.distributions.Normal(prior.center_of(n, mu[n]), prior.scale_of(n)),
        ).sum()
        for n in mu
    )
    torch.testing.assert_close(kl_divergence(mu, sigma, prior), expected)


def test_softplus_inverse_is_exact():
    x = torch.tensor([1e-6, 1e-3, 0.5, 3.0, 40.0], dtype=torch.float64)
    torch.testing.assert_close(torch.nn.functional.softplus(softplus_inverse(x)), x, rtol=1e-12, atol=0)


def test_state_checkpoint_resumes_to_the_same_result(regression, tmp_path):
    batch, _, _ = regression
    model, prior = Linear(), GaussianPrior(scale=PRIOR)
    straight = init_vi({"w": model.w.detach()}, 0.1, 0.05, seed=3)
    for _ in range(20):
        vi_step(straight, model, batch, nll, N, prior, mc_samples=2)
    first = init_vi({"w": model.w.detach()}, 0.1, 0.05, seed=3)
    for _ in range(10):
        vi_step(first, model, batch, nll, N, prior, mc_samples=2)
    torch.save(first.state_dict(), tmp_path / "vi.ckpt")
    resumed = init_vi({"w": torch.ones(D, dtype=torch.float64)}, 0.5, 0.05, seed=99)  # other start: all overwritten
    resumed.load_state_dict(torch.load(tmp_path / "vi.ckpt", weights_only=True))
    for _ in range(10):
        vi_step(resumed, model, batch, nll, N, prior, mc_samples=2)
    assert resumed.step == 20
    assert torch.equal(resumed.means["w"], straight.means["w"])
    assert torch.equal(resumed.raw_scales["w"], straight.raw_scales["w"])


def test_a_non_finite_objective_raises_and_leaves_the_state(regression):
    batch, _, _ = regression
    model = Linear()
    state = init_vi({"w": model.w.detach()}, 0.1, 0.05, seed=0)
    before = state.means["w"].detach().clone()
    with pytest.raises(FloatingPointError, match="negative ELBO is nan at step 0"):
        vi_step(state, model, batch, lambda out, b: out * float("nan"), N, GaussianPrior())
    assert torch.equal(state.means["w"], before) and state.step == 0


def test_gaussian_draws_are_seeded_and_have_the_fitted_moments():
    mu = {"w": torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)}
    sigma = {"w": torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)}
    a, b, c = (sample_gaussian(mu, sigma, 4000, seed) for seed in (5, 5, 6))
    assert a["w"].shape == (4000, 3) and torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    se = sigma["w"] / 4000**0.5
    assert torch.all((a["w"].mean(0) - mu["w"]).abs() < 4 * se)
    torch.testing.assert_close(a["w"].std(0), sigma["w"], rtol=0.06, atol=0)


def test_posterior_file_stores_the_gaussian_and_resamples_at_any_k(tmp_path):
    config = tiny_model_config(["O", "Ti"], r_max=ModelConfig.r_max)
    state = build_model(config).state_dict()
    name = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"
    means = {name: state[name]}
    scales = {name: torch.full_like(state[name], 0.01)}
    shared = {n: t for n, t in state.items() if n != name}
    post = posterior_from_gaussian(config, shared, means, scales, 5, seed=0, method="vi",
                                   hyperparameters={"n_samples": 5}, energy_references={"O": -1.0, "Ti": -2.0})
    path = tmp_path / "posterior.h5"
    save_vi_posterior(post, means, scales, path)
    loaded = load_posterior(path)  # an ordinary posterior file: the Gaussian group is ignored here
    assert loaded.n_samples == 5 and torch.equal(loaded.samples[name], post.samples[name])
    m, s = load_gaussian(path)
    assert torch.equal(m[name], means[name]) and torch.equal(s[name], scales[name])
    again = resample(path, 12, seed=4)
    assert again.n_samples == 12 and again.method == "vi" and again.hyperparameters["n_samples"] == 12
    assert again.energy_references == {"O": -1.0, "Ti": -2.0} and set(again.shared) == set(shared)
    torch.testing.assert_close(again.samples[name], sample_gaussian(means, scales, 12, 4)[name], rtol=0, atol=0)
    plain = tmp_path / "map.h5"
    Posterior.from_state_dicts(config, [state]).save(plain)
    with h5py.File(plain, "r") as f:
        assert "vi" not in f
    with pytest.raises(PosteriorFileError, match="holds no fitted Gaussian"):
        resample(plain, 3, seed=0)


@pytest.mark.parametrize("case, elbo_flat, scale_flat", [
    ("elbo falling", False, True), ("plateau", True, True), ("scales settling", True, True),
    ("scales growing", True, False)])
def test_convergence_report_reads_the_trace(tmp_path, case, elbo_flat, scale_flat):
    """A negative ELBO that still falls beyond its noise is not converged; the smooth median scale is judged by
    its relative drift between the last two fifths (0.5 % settles, 3 % still grows), however small its noise."""
    rng = np.random.default_rng(1)
    plateau = np.r_[np.linspace(100.0, 0.0, 100), np.zeros(100)]
    elbo = np.linspace(100.0, 0.0, 200) if case == "elbo falling" else plateau
    growth = {"scales settling": 0.005, "scales growing": 0.03}.get(case, 0.0)  # per fifth of the trace
    scale = 0.05 * (1 + growth * np.arange(200) / 40) + 1e-7 * rng.normal(size=200)
    with (tmp_path / "trace.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "neg_elbo", "nll", "kl", "median_scale"])
        for i, (value, s) in enumerate(zip(elbo + rng.normal(size=elbo.size), scale)):
            writer.writerow([10 * i, value, value, 0.0, s])
    report = report_convergence(tmp_path)
    assert report["neg_elbo"]["flat"] is elbo_flat and report["median_scale"]["flat"] is scale_flat
    assert report["flat"] is (elbo_flat and scale_flat)
    assert json.loads((tmp_path / "convergence.json").read_text()) == report
