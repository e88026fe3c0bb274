"""Learned observation noise: the Gaussian likelihood recovers a known noise level, and SG-MCMC that samples the
noise with the weights draws from the exact joint posterior of Bayesian linear regression with unknown noise."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from test_sgmcmc import assert_moments, run_chains

from mlip_uq._keys import ENERGY_LOG_SIGMA_KEY, PER_ATOM_LOG_SIGMA_KEY
from mlip_uq.data import atoms_to_graph, collate, read_frames
from mlip_uq.inference.loss import loss_terms
from mlip_uq.inference.noise import fit_noise_on_validation
from mlip_uq.inference.sghmc import AdaptiveSGHMC
from mlip_uq.model import build_model

DTYPE = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny steps: intra-op threads only add overhead (see test_sgmcmc)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_learned_noise_recovers_the_noise_added_to_a_fixed_models_labels(tio2_path):
    """Labels = a fixed model's predictions + Gaussian noise of known σ; with the model fixed, training only the
    noise log-factors by the MAP objective must end at the maximum-likelihood stds, sqrt(mean ε²) of the noise
    actually drawn (per element for forces), which lie within 4 standard errors of the true σ."""
    config = tiny_model_config(["O", "Ti"], r_max=4.0, avg_num_neighbors=10.0, dtype="float64",
                               force_noise=0.3, energy_noise=0.05)
    model = build_model(config)
    frames = read_frames(tio2_path, index=":24")
    batch = collate([atoms_to_graph(a, config.type_names, config.r_max, dtype=DTYPE) for a in frames])
    clean = model(dict(batch))
    sigma_f, sigma_e = 0.04, 0.002  # eV/Å, eV/atom
    gen = torch.Generator().manual_seed(0)
    n_atoms = batch["num_atoms"].to(DTYPE)
    eps_f = sigma_f * torch.randn(clean["forces"].shape, generator=gen, dtype=DTYPE)
    eps_e = sigma_e * torch.randn(n_atoms.shape, generator=gen, dtype=DTYPE)
    batch["forces"] = clean["forces"].detach() + eps_f
    batch["total_energy"] = clean["total_energy"].detach() + (eps_e * n_atoms).view(-1, 1)

    noise = [p for n, p in model.named_parameters() if "observation_noise" in n]
    model.requires_grad_(False)
    for p in noise:
        p.requires_grad_(True)
    # the same objective and gradients as in training mode: the fixed model's energy and forces do not depend on
    # the noise log-factors, so they need no graph (eval mode: no create_graph, no double backward each step)
    model.eval()
    opt = torch.optim.Adam(noise, lr=0.05)
    for _ in range(300):
        out = model(dict(batch))
        out["total_energy"] = out["total_energy"].detach()
        terms = loss_terms(out, batch)
        opt.zero_grad()
        (terms["energy"] + terms["forces"]).backward()
        opt.step()

    out = model(dict(batch))
    types = batch["atom_types"].view(-1)
    learned_f = out[PER_ATOM_LOG_SIGMA_KEY].detach().exp().view(-1)
    for t in range(len(config.type_names)):
        drawn = eps_f[types == t]
        mle = drawn.square().mean().sqrt()
        assert learned_f[types == t][0] == pytest.approx(mle.item(), rel=1e-3)
        assert abs(mle.item() / sigma_f - 1) < 4 / math.sqrt(2 * drawn.numel())
    learned_e = out[ENERGY_LOG_SIGMA_KEY].detach().exp()[0, 0].item()
    mle_e = eps_e.square().mean().sqrt().item()
    assert learned_e == pytest.approx(mle_e, rel=1e-3)
    assert abs(mle_e / sigma_e - 1) < 4 / math.sqrt(2 * len(frames))


@pytest.mark.parametrize("noise", ["learned", "head", "fixed"])
def test_noise_fitted_on_held_out_frames_is_their_maximum_likelihood_std(tio2_path, noise):
    """Held-out labels = the model's predictions + Gaussian noise; fit_noise_on_validation makes each element's
    force std and the energy std the root mean square of the drawn noise (in units of the head's per-atom factors,
    whose ratios it keeps), split over two batches; a fixed noise is left as configured."""
    config = tiny_model_config(["O", "Ti"], r_max=4.0, avg_num_neighbors=10.0, dtype="float64",
                               force_noise=0.3, energy_noise=0.05, noise=noise)
    model = build_model(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "noise_head" in name:  # a head that gives the atoms different factors
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
    frames = read_frames(tio2_path, index=":24")
    batch = collate([atoms_to_graph(a, config.type_names, config.r_max, dtype=DTYPE) for a in frames])
    clean = model(dict(batch))
    before = clean[PER_ATOM_LOG_SIGMA_KEY].detach().view(-1)
    n_atoms = batch["num_atoms"].to(DTYPE)
    eps_f = 0.04 * torch.randn(clean["forces"].shape, generator=gen, dtype=DTYPE)
    eps_e = 0.002 * torch.randn(n_atoms.shape, generator=gen, dtype=DTYPE)
    batch["forces"] = clean["forces"].detach() + eps_f
    batch["total_energy"] = clean["total_energy"].detach() + (eps_e * n_atoms).view(-1, 1)
    halves = [collate([atoms_to_graph(a, config.type_names, config.r_max, dtype=DTYPE) for a in part])
              for part in (frames[:10], frames[10:])]
    for half, (lo, hi) in zip(halves, ((0, 10), (10, 24))):
        atoms = slice(int(n_atoms[:lo].sum()), int(n_atoms[:hi].sum()))
        half["forces"], half["total_energy"] = batch["forces"][atoms], batch["total_energy"][lo:hi]

    factors = fit_noise_on_validation(model, halves)
    out = model(dict(batch))
    after = out[PER_ATOM_LOG_SIGMA_KEY].detach().view(-1)
    types = batch["atom_types"].view(-1)
    if noise == "fixed":
        assert factors == {} and torch.equal(after, before)
        return
    for t, element in enumerate(config.type_names):
        z = eps_f[types == t] / before[types == t].exp().unsqueeze(-1)
        shift = after[types == t] - before[types == t]
        torch.testing.assert_close(shift, torch.full_like(shift, math.log(z.square().mean().sqrt())))
        assert factors[f"forces_{element}"] == pytest.approx(z.square().mean().sqrt().item(), rel=1e-10)
    z_e = eps_e / clean[ENERGY_LOG_SIGMA_KEY].detach().view(-1).exp()
    torch.testing.assert_close(out[ENERGY_LOG_SIGMA_KEY].detach().view(-1) - clean[ENERGY_LOG_SIGMA_KEY].detach().view(-1),
                               torch.full_like(z_e, math.log(z_e.square().mean().sqrt())))
    assert "stress" not in factors  # the frames have no stress labels: its std stays


def test_posterior_noise_fitted_on_held_out_frames_is_each_samples_own_fit_times_one_factor(tio2_path):
    """Every sample of a posterior gets the held-out noise fit of its own energy model, then one factor common to
    all samples (and elements) per quantity; the other parameters untouched. With the noise shared by all samples
    (not stochastic), one fit (the first sample's) for all, then the common factor."""
    from mlip_uq.inference.noise import fit_posterior_noise_on_validation
    from mlip_uq.inference.priors import select_stochastic
    from mlip_uq.model import ModelConfig
    from mlip_uq.posterior import Posterior

    config = tiny_model_config(["O", "Ti"], r_max=4.0, avg_num_neighbors=10.0, dtype="float64", force_noise=0.3,
                               energy_noise=0.05)
    states = [build_model(ModelConfig.from_dict({**config.to_dict(), "seed": s})).state_dict() for s in (0, 1)]
    val = [atoms_to_graph(a, config.type_names, config.r_max, dtype=DTYPE) for a in read_frames(tio2_path, index=":12")]
    batches = [collate(val[i:i + 5]) for i in range(0, len(val), 5)]

    def fitted_alone(state):
        model = build_model(config)
        model.load_state_dict(state)
        fit_noise_on_validation(model, batches)
        return model.state_dict()

    for stochastic in ("all", {"patterns": ["*per_atom_energy_readout*"]}):
        names = select_stochastic(build_model(config), stochastic)
        posterior = Posterior.from_state_dicts(config, [dict(states[0], **{n: st[n] for n in names}) for st in states],
                                               stochastic=names)
        fitted = fit_posterior_noise_on_validation(posterior, val, batch_size=5)
        common = {}
        for k in range(2):
            # sampled noise: this sample's own fit; shared noise: the first sample's fit; then the common factor
            expected = fitted_alone(posterior.state_dict(k if stochastic == "all" else 0))
            for name, value in fitted.state_dict(k).items():
                if name.endswith(("force_log_factor", "energy_log_factor")):  # fitted (no stress labels here)
                    shift = value - expected[name]
                    factor = common.setdefault(name.rsplit(".", 1)[-1], float(shift.flatten()[0]))
                    torch.testing.assert_close(shift, torch.full_like(shift, factor))
                elif "observation_noise" in name:
                    torch.testing.assert_close(value, expected[name], rtol=1e-12, atol=1e-12)
                else:
                    assert torch.equal(value, posterior.state_dict(k)[name]), name
        assert set(common) == {"force_log_factor", "energy_log_factor"}


def test_posterior_noise_factor_recovers_the_scale_of_noise_drawn_around_the_spread(tio2_path):
    """Held-out labels drawn around a 3-sample posterior's mean with variance spread + c² noise² per force
    component and per energy (c = 0.6: every sample's noise std too wide by 1/0.6, as a noise fitted to each model
    alone is once the spread is added); posterior_noise_factors recovers c within 4 standard errors, and
    fit_posterior_noise_on_validation(per_sample=False) shifts every sample's force and energy log-factors by
    log c, all else unchanged, and lowers the held-out NLL."""
    from conftest import seeded_posterior

    from mlip_uq.evaluate import predict_graphs
    from mlip_uq.inference.noise import fit_posterior_noise_on_validation, posterior_noise_factors
    from mlip_uq.posterior.predict import predict_samples, predictive_moments

    c_true = 0.6
    config = tiny_model_config(["O", "Ti"], r_max=4.0, avg_num_neighbors=10.0, dtype="float64", force_noise=0.1,
                               energy_noise=0.02)  # noise stds of the order of the untrained samples' spread
    posterior = seeded_posterior(config)
    val = [atoms_to_graph(a, config.type_names, config.r_max, dtype=DTYPE) for a in read_frames(tio2_path, index=":300")]
    gen = torch.Generator().manual_seed(2)
    noise_share = {"energy": [], "forces": []}  # c² noise² / (spread + c² noise²) of each label, at the true c
    for start in range(0, len(val), 50):
        part = val[start:start + 50]
        m = predictive_moments(predict_samples(posterior, collate(part)))
        labels = {}
        for quantity, mean, std, spread in (("energy", m.energy, m.energy_std, m.energy_std_epistemic),
                                            ("forces", m.forces, m.forces_std, m.forces_std_epistemic)):
            noise_var = c_true**2 * (std**2 - spread**2)
            noise_share[quantity].append((noise_var / (spread**2 + noise_var)).ravel())
            drawn = torch.randn(mean.shape, generator=gen, dtype=DTYPE)
            labels[quantity] = torch.from_numpy(mean + np.sqrt(spread**2 + noise_var) * drawn.numpy())
        ends = np.cumsum(m.n_atoms)
        for i, graph in enumerate(part):
            graph["total_energy"] = labels["energy"][i].view(1, 1)
            graph["forces"] = labels["forces"][ends[i] - m.n_atoms[i]:ends[i]]

    factors = posterior_noise_factors(posterior, val, batch_size=50)
    for quantity, shares in noise_share.items():
        w = np.concatenate(shares)
        assert 0.1 < w.mean() < 0.9, (quantity, w.mean())  # both parts of the variance shape the fit
        standard_error = 1 / math.sqrt(2 * np.sum(w**2))  # of log c, from the Fisher information
        assert abs(math.log(factors[quantity] / c_true)) < 4 * standard_error, (quantity, factors)

    fitted = fit_posterior_noise_on_validation(posterior, val, batch_size=50, per_sample=False)
    for k in range(posterior.n_samples):
        for name, value in fitted.state_dict(k).items():
            before = posterior.state_dict(k)[name]
            if name.endswith("force_log_factor") or name.endswith("energy_log_factor"):
                quantity = "forces" if "force" in name else "energy"
                torch.testing.assert_close(value - before, torch.full_like(value, math.log(factors[quantity])))
            else:
                assert torch.equal(value, before), name

    def nll(p):
        z = (p.forces_pred - p.forces_true) / p.forces_std_uncalibrated
        return float(np.mean(np.log(p.forces_std_uncalibrated) + 0.5 * z**2))

    assert nll(predict_graphs(fitted, val, 50)) < nll(predict_graphs(posterior, val, 50))


def test_sampled_noise_and_weights_match_the_exact_posterior_of_linear_regression():
    """y = X w + ε, ε ~ N(0, σ²) with σ unknown; the noise is sampled as a log-factor f (σ = σ₀ eᶠ, σ₀ = 1) with
    the weights, as the model's observation noise is: prior w ~ N(0, s² I), f ~ N(0, 1) (the package's default
    noise prior). The exact posterior, by quadrature over f: p(f | y) ∝ N(f; 0, 1) N(y; 0, s² XXᵀ + e^{2f} I),
    and w | f, y Gaussian; its means and variances of w, f and of the precision τ = e^{-2f} are compared with
    the draws of 64 chains (full-batch gradients) within ESS-based tolerances (test_sgmcmc.assert_moments) plus
    a 3 % allowance for the discretisation bias of the small step."""
    n_data, dim, n_chains = 100, 2, 64
    true_sd, prior_sd, noise_prior_sd, lr, friction = 0.3, 1.0, 1.0, 3e-3, 0.05
    gen = torch.Generator().manual_seed(3)
    x_data = torch.randn(n_data, dim, generator=gen, dtype=DTYPE)
    y_data = x_data @ torch.tensor([0.7, -0.4], dtype=DTYPE) + true_sd * torch.randn(n_data, generator=gen, dtype=DTYPE)

    # exact posterior on a grid of f
    x, y = x_data.numpy(), y_data.numpy()
    grid = np.linspace(-2.2, -0.4, 1201)
    log_post, w_mean, w_var = [], [], []
    for f in grid:
        cov_y = prior_sd**2 * x @ x.T + np.exp(2 * f) * np.eye(n_data)
        _, logdet = np.linalg.slogdet(cov_y)
        log_post.append(-0.5 * f**2 / noise_prior_sd**2 - 0.5 * logdet - 0.5 * y @ np.linalg.solve(cov_y, y))
        precision = x.T @ x * np.exp(-2 * f) + np.eye(dim) / prior_sd**2
        cov = np.linalg.inv(precision)
        w_mean.append(cov @ x.T @ y * np.exp(-2 * f))
        w_var.append(np.diag(cov))
    p = np.exp(np.array(log_post) - max(log_post))
    p /= p.sum()
    assert p[0] < 1e-12 and p[-1] < 1e-12  # the grid holds the whole posterior
    w_mean, w_var = np.array(w_mean), np.array(w_var)
    mean_w = p @ w_mean
    sd_w = np.sqrt(p @ (w_var + w_mean**2) - mean_w**2)
    mean_f, sd_f = p @ grid, np.sqrt(p @ grid**2 - (p @ grid) ** 2)
    tau = np.exp(-2 * grid)
    mean_tau, sd_tau = p @ tau, np.sqrt(p @ tau**2 - (p @ tau) ** 2)

    # chains start spread about the posterior mean (at the mean itself the full-batch gradient is ~0, and the
    # preconditioner seeded from it, P = 1 / |g|, would give a huge first kick)
    start = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.tensor(mean_w) + torch.tensor(sd_w) * torch.randn(n_chains, dim, generator=start,
                                                                                 dtype=DTYPE))
    f = torch.nn.Parameter(mean_f + sd_f * torch.randn(n_chains, 1, generator=start, dtype=DTYPE))
    opt = AdaptiveSGHMC([{"params": [w], "prior_scale": prior_sd}, {"params": [f], "prior_scale": noise_prior_sd}],
                        lr=lr, num_data=n_data, friction=friction, seed=0)

    def set_grad():  # gradient of the mean NLL per datum, 0.5 r² e^{-2f} + f, over the whole data set
        w.grad = f.grad = None
        resid = y_data - w @ x_data.T  # (C, N)
        nll = (0.5 * resid.square() * torch.exp(-2.0 * f) + f).mean(-1).sum()
        nll.backward()

    draws = run_chains(opt, set_grad, lambda: torch.cat([w.detach(), f.detach(), torch.exp(-2 * f.detach())], -1),
                       2000, 1000, 6000)
    assert_moments(draws, np.r_[mean_w, mean_f, mean_tau], np.r_[sd_w, sd_f, sd_tau], bias=np.full(dim + 2, 0.03))


def test_an_element_without_gradient_stays_put_until_its_first_gradient_seeds_its_preconditioner():
    """A per-element parameter of an element absent from the first minibatches (gradient exactly 0 at its prior
    centre) has P = 0 and does not move, even at temperature 1; its first non-zero gradient seeds m̂2 = g² (P =
    1/|g|, not 1/eps)."""
    theta = torch.nn.Parameter(torch.zeros(2, dtype=DTYPE))
    opt = AdaptiveSGHMC([theta], lr=1e-2, num_data=10, prior_scale=1.0, seed=0)
    for _ in range(5):  # element 1 absent: its gradient is 0
        theta.grad = torch.tensor([1.0, 0.0], dtype=DTYPE)
        opt.step()
    assert theta[1].item() == 0.0 and opt.preconditioner(theta)[1].item() == 0.0
    theta.grad = torch.tensor([1.0, 0.5], dtype=DTYPE)  # element 1 appears: ∇U = 10 · 0.5 (+ prior, θ = 0)
    opt.step()
    assert opt.preconditioner(theta)[1].item() == pytest.approx(1 / 5.0, rel=1e-6)
    assert abs(theta[1].item()) < 0.1
