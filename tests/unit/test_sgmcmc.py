"""mlip_uq.inference.sghmc: AdaptiveSGHMC against targets whose moments are known in closed form.

Many independent chains run at once: a parameter of shape (C, d) is C chains of a d-dimensional target whose
coordinates (and chains) are independent, so one optimizer step advances them all (the preconditioner is
element-wise, so every element is its own chain with its own P).

Tolerances (``assert_moments``), with ``x`` of shape (C chains, n draws, d):

* mean: |x̄ - μ| < 4 σ / sqrt(ESS), ESS from ``effective_sample_size`` on θ (Geyer's truncation is
  conservative here: for underdamped SGHMC the autocorrelation of θ oscillates and its first negative lobe
  stops the sum early, so τ is over-estimated);
* variance: |mean (θ - μ)² / σ² - 1| < 4 sqrt(2 / ESS₂) + bias, where ESS₂, the effective sample size of the
  squared deviations, is estimated by batch means over the C independent chains (ESS₂ = 2 / SE², SE the
  standard error of the mean over chains of each chain's mean of (θ - μ)²/σ²). Not ``effective_sample_size``
  on (θ - μ)²: its autocorrelation is ρ_θ(t)², which for underdamped chains touches zero every half period,
  so Geyer's initial positive sequence stops too early and over-estimates ESS₂ (by ~3x here). ``bias`` is the
  discretisation bias of the variance predicted in closed form for the frozen P (and, for minibatches, the
  gradient-noise bias, from the stationary covariance of the linear recursion); the step is chosen small
  enough that it stays a few per cent.

4 standard errors: for ~60 checked coordinates the chance of a false failure is < 1 % (and seeds are fixed).
"""

import io

import numpy as np
import pytest
import torch
from scipy.linalg import solve_discrete_lyapunov

from mlip_uq.inference.diagnostics import effective_sample_size
from mlip_uq.inference.sghmc import (
    AdaptiveSGHMC,
    potential_gradient,
    preconditioner_from_moment,
    sghmc_update_,
    update_second_moment,
)

DTYPE = torch.float64
N_SIGMA = 4.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of steps on tiny tensors: intra-op threads only add wake-up overhead (10x slower on a
    loaded 2-core machine), so this module runs single-threaded and restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_chains(opt, set_grad, record, n_adapt, n_frozen_burn, n_draws):
    """Burn in with adaptation, freeze, burn in more with P frozen, then keep ``record()`` after each of
    ``n_draws`` steps. Returns an array (C, n_draws, ...) with the chain axis first."""
    for _ in range(n_adapt):
        set_grad()
        opt.step()
    opt.freeze_preconditioner()
    for _ in range(n_frozen_burn):
        set_grad()
        opt.step()
    draws = []
    for _ in range(n_draws):
        set_grad()
        opt.step()
        draws.append(record())
    return np.moveaxis(torch.stack(draws).numpy(), 0, 1)


def assert_moments(x, mu, sd, bias, min_ess=300.0):
    """Check mean and variance of draws ``x`` (C, n, d) against N(μ, σ²) with ESS-derived tolerances.

    ``bias`` (d,): the predicted relative bias of the variance (added to the variance tolerance).
    Returns (ess_mean, ess_var, tolerances) for messages.
    """
    n_chains = x.shape[0]
    ess = effective_sample_size(x)
    mean_err = np.abs(x.mean(axis=(0, 1)) - mu)
    mean_tol = N_SIGMA * sd / np.sqrt(ess)
    per_chain = (((x - mu) / sd) ** 2).mean(axis=1)  # (C, d)
    se = per_chain.std(axis=0, ddof=1) / np.sqrt(n_chains)
    ess_var = 2.0 / se**2
    var_err = np.abs(per_chain.mean(axis=0) - 1.0)
    var_tol = N_SIGMA * np.sqrt(2.0 / ess_var) + np.abs(bias)
    # a tolerance is only meaningful with enough effective samples
    assert np.all(ess > min_ess) and np.all(ess_var > min_ess), (ess, ess_var)
    assert np.all(mean_err < mean_tol), f"mean error / tolerance {mean_err / mean_tol}"
    assert np.all(var_err < var_tol), f"variance error {var_err}, tolerance {var_tol}"
    return ess, ess_var, var_tol


def gaussian_variance_ratio(h, friction):
    """Exact stationary Var(θ) / σ² of the recursion on a Gaussian, h = lr P / σ² (docs/sghmc.md)."""
    return 2.0 * (2.0 - friction) / (4.0 - 2.0 * friction - h)


# ------------------------------------------------------------------------------------------ pure functions
def test_potential_gradient_is_minus_log_posterior_gradient():
    """∇U = N · ∇(mean minibatch NLL) + (θ - c)/s², checked against autograd of U written out."""
    gen = torch.Generator().manual_seed(0)
    n_data, batch = 1000, 16
    x = torch.randn(batch, 3, generator=gen, dtype=DTYPE)
    y = torch.randn(batch, generator=gen, dtype=DTYPE)
    theta = torch.randn(3, generator=gen, dtype=DTYPE, requires_grad=True)
    centre, scale = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE), 0.7

    mean_nll = (0.5 * (y - x @ theta) ** 2).mean()
    (grad_mean_nll,) = torch.autograd.grad(mean_nll, theta)
    u = n_data * (0.5 * (y - x @ theta) ** 2).mean() + 0.5 * ((theta - centre) ** 2).sum() / scale**2
    (grad_u,) = torch.autograd.grad(u, theta)
    got = potential_gradient(grad_mean_nll, theta.detach(), n_data, scale, centre)
    torch.testing.assert_close(got, grad_u, rtol=1e-13, atol=0)
    # flat prior: only the scaled likelihood
    torch.testing.assert_close(potential_gradient(grad_mean_nll, theta.detach(), n_data), n_data * grad_mean_nll)


def test_second_moment_seeded_and_equal_to_bias_corrected_adam():
    """m̂2 = g² exactly after the first gradient; later it equals Adam's m2 / (1 - β2^t) of a zero-started EMA."""
    gen = torch.Generator().manual_seed(1)
    beta2 = 0.99
    g1 = torch.randn(5, generator=gen, dtype=DTYPE)
    m2, m2_max = update_second_moment(torch.zeros(5, dtype=DTYPE), torch.zeros(5, dtype=DTYPE), g1, 1, beta2)
    assert torch.equal(m2, g1 * g1) and torch.equal(m2_max, g1 * g1)
    assert torch.equal(preconditioner_from_moment(m2_max, 1e-8), 1.0 / (g1.abs() + 1e-8))

    raw, running_max = (1 - beta2) * g1**2, g1**2
    for t in range(2, 60):
        g = torch.randn(5, generator=gen, dtype=DTYPE) * (3.0 if t < 10 else 0.3)
        m2, m2_max = update_second_moment(m2, m2_max, g, t, beta2)
        raw = beta2 * raw + (1 - beta2) * g**2
        running_max = torch.maximum(running_max, raw / (1 - beta2**t))
        torch.testing.assert_close(m2, raw / (1 - beta2**t), rtol=1e-12, atol=0)
        torch.testing.assert_close(m2_max, running_max, rtol=1e-12, atol=0)


def test_sghmc_update_formula():
    theta, v = torch.tensor([1.0, -2.0], dtype=DTYPE), torch.tensor([0.1, 0.2], dtype=DTYPE)
    g, p, xi = torch.tensor([3.0, -1.0], dtype=DTYPE), torch.tensor([0.5, 2.0], dtype=DTYPE), torch.tensor(
        [0.3, -1.2], dtype=DTYPE
    )
    lr, alpha, temp = 0.01, 0.1, 2.0
    expected_v = (1 - alpha) * v - lr * p * g + torch.sqrt(2 * alpha * lr * p * temp) * xi
    expected_theta = theta + expected_v
    new_theta, new_v = sghmc_update_(theta, v, g, p, lr, alpha, temp, xi)
    assert new_theta is theta and new_v is v  # in place
    torch.testing.assert_close(new_v, expected_v, rtol=1e-14, atol=0)
    torch.testing.assert_close(new_theta, expected_theta, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="noise"):
        sghmc_update_(theta.clone(), v.clone(), g, p, lr, alpha, temp)
    # temperature 0: the noise is ignored
    v0 = torch.tensor([0.1, 0.2], dtype=DTYPE)
    expected_v0 = (1 - alpha) * v0 - lr * p * g
    torch.testing.assert_close(sghmc_update_(theta.clone(), v0, g, p, lr, alpha, 0.0, xi)[1], expected_v0, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- 1. anisotropic Gaussian target
SIGMA = torch.logspace(-3, 0, 12, dtype=DTYPE)  # standard deviations over three decades
GAUSS = dict(n_chains=64, lr=1e-4, friction=0.02, n_adapt=2000, n_frozen_burn=1000, n_draws=6000)


def run_gaussian(adapt: bool, lr: float):
    """Chains on N(0, diag σ²), num_data = 1, p.grad = ∇U = θ / σ², started one σ from the mean."""
    theta = torch.nn.Parameter(SIGMA.repeat(GAUSS["n_chains"], 1))
    opt = AdaptiveSGHMC([theta], lr=lr, num_data=1, friction=GAUSS["friction"], seed=0)
    if not adapt:
        opt.freeze_preconditioner()  # before the first step: P = 1, plain SGHMC

    def set_grad():
        theta.grad = theta.detach() / SIGMA**2

    x = run_chains(opt, set_grad, lambda: theta.detach().clone(), GAUSS["n_adapt"], GAUSS["n_frozen_burn"],
                   GAUSS["n_draws"])
    return x, opt.preconditioner(theta).numpy()


@pytest.fixture(scope="module")
def adaptive_gaussian():
    return run_gaussian(adapt=True, lr=GAUSS["lr"])


def test_anisotropic_gaussian_moments(adaptive_gaussian):
    """Mean and variance of every coordinate within ESS tolerances; σ spans 1e-3 .. 1.

    The preconditioner converges to P ≈ 0.8 σ (1 / RMS gradient, times the AMSGrad maximum's margin), so
    h = lr P / σ² ≈ 0.08 on the stiffest coordinate: predicted variance bias h / (4 - 2α - h) ≈ 2 %.
    """
    x, precond = adaptive_gaussian
    sigma = SIGMA.numpy()
    h = GAUSS["lr"] * precond / sigma**2                        # (C, d)
    bias = gaussian_variance_ratio(h, GAUSS["friction"]).mean(axis=0) - 1.0
    assert bias.max() < 0.03                                    # the step is small enough
    np.testing.assert_allclose(precond.mean(axis=0) / sigma, 0.8, rtol=0.2)  # P adapted to each coordinate's scale
    assert_moments(x, np.zeros(12), sigma, bias)


def test_preconditioner_beats_plain_sghmc(adaptive_gaussian):
    """Same step count, and a step giving the same h on the stiffest coordinate: without the preconditioner
    the widest coordinate (1000x wider) barely mixes (h = lr σ_min / σ_max² is 1000x smaller).

    With M chains that do not mix, the ESS estimator bottoms out near M / 2 (τ̂ <= 2N - 1), so the ratio
    asserted here is a lower bound of the real gain (~1000x in autocorrelation time).
    """
    x_adapt, _ = adaptive_gaussian
    x_plain, precond = run_gaussian(adapt=False, lr=GAUSS["lr"] * 0.8 * SIGMA[0].item())
    assert np.all(precond == 1.0)
    ess_adapt = effective_sample_size(x_adapt[:, :, -1])
    ess_plain = effective_sample_size(x_plain[:, :, -1])
    n_chains = GAUSS["n_chains"]
    assert ess_plain < n_chains  # less than one effective draw per chain
    assert ess_adapt > 10 * ess_plain and ess_adapt > 5 * n_chains, (ess_adapt, ess_plain)


def test_discretisation_bias_matches_closed_form():
    """A large step (h = 1, frozen P = 1) inflates the variance by exactly 2(2-α)/(4-2α-h) = 1.357 for α = 0.1:
    the sampler implements the documented recursion (order of updates and noise scale included)."""
    lr, friction, n_chains = 1.0, 0.1, 4096
    theta = torch.nn.Parameter(torch.zeros(n_chains, dtype=DTYPE))
    opt = AdaptiveSGHMC([theta], lr=lr, num_data=1, friction=friction, seed=3)
    opt.freeze_preconditioner()

    def set_grad():
        theta.grad = theta.detach().clone()  # σ = 1

    x = run_chains(opt, set_grad, lambda: theta.detach().clone(), 0, 300, 1000)
    per_chain = (x**2).mean(axis=1)
    se = per_chain.std(ddof=1) / np.sqrt(n_chains)
    ratio = gaussian_variance_ratio(1.0, friction)
    assert abs(per_chain.mean() - ratio) < N_SIGMA * se
    assert abs(per_chain.mean() - 1.0) > 20 * se  # the bias is real and resolved


# ----------------------------------------------------------------------------- 2. Bayesian linear regression
def test_bayesian_linear_regression_minibatch():
    """y = X w + ε, ε ~ N(0, σ²), prior w ~ N(0, s² I); minibatches of 50 of N = 200, with replacement.

    p.grad is the gradient of the mean minibatch NLL, num_data = N, the prior through prior_scale. The
    posterior is N(A⁻¹ Xᵀy / σ², A⁻¹), A = XᵀX / σ² + I / s². Minibatch noise adds η P ζ (ζ: the noise of
    N · mean minibatch gradient, covariance V = N² / b · Cov_i(∇ℓ_i)) to the velocity, i.e. an extra variance
    of order η P V / (2α); the predicted bias comes from the stationary covariance of the linear recursion
    with the frozen P of each chain (discrete Lyapunov equation), and lr = 5e-5 keeps it below 5 %. The
    chains start at the posterior mean (as from a MAP fit).
    """
    n_data, dim, batch, n_chains = 200, 3, 50, 128
    noise_sd, prior_sd, lr, friction = 0.5, 1.0, 5e-5, 0.05
    gen = torch.Generator().manual_seed(1)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.0], [0.0, 0.3, 2.0]], dtype=DTYPE)
    x_data = torch.randn(n_data, dim, generator=gen, dtype=DTYPE) @ mix.T
    y_data = x_data @ torch.tensor([0.5, -1.0, 0.2], dtype=DTYPE)
    y_data = y_data + noise_sd * torch.randn(n_data, generator=gen, dtype=DTYPE)
    precision = x_data.T @ x_data / noise_sd**2 + torch.eye(dim, dtype=DTYPE) / prior_sd**2
    cov = torch.linalg.inv(precision)
    mean = cov @ x_data.T @ y_data / noise_sd**2

    w = torch.nn.Parameter(mean.repeat(n_chains, 1))
    opt = AdaptiveSGHMC([w], lr=lr, num_data=n_data, friction=friction, prior_scale=prior_sd, seed=0)
    batch_gen = torch.Generator().manual_seed(2)

    def set_grad():  # gradient of the mean NLL per datum over each chain's own minibatch
        idx = torch.randint(n_data, (n_chains, batch), generator=batch_gen)
        xb, yb = x_data[idx], y_data[idx]
        resid = yb - torch.einsum("cbd,cd->cb", xb, w.detach())
        w.grad = -torch.einsum("cbd,cb->cd", xb, resid) / (batch * noise_sd**2)

    draws = run_chains(opt, set_grad, lambda: w.detach().clone(), 3000, 2000, 8000)

    # predicted relative bias of each marginal variance, averaged over chains
    mean_np, cov_np, a = mean.numpy(), cov.numpy(), precision.numpy()
    per_datum = -(x_data * (y_data - x_data @ mean)[:, None]).numpy() / noise_sd**2
    v_noise = n_data**2 / batch * np.cov(per_datum.T, ddof=0)
    eye = np.eye(dim)
    predicted = []
    for p in opt.preconditioner(w).numpy():
        pm = np.diag(p)
        step_v = np.hstack([-lr * pm @ a, (1 - friction) * eye])  # v' = (1-α) v - η P A θ + noise
        step_theta = np.hstack([eye - lr * pm @ a, (1 - friction) * eye])  # θ' = θ + v'
        q = 2 * friction * lr * pm + lr**2 * pm @ v_noise @ pm
        stationary = solve_discrete_lyapunov(np.vstack([step_theta, step_v]), np.block([[q, q], [q, q]]))
        predicted.append(stationary[:dim, :dim].diagonal() / cov_np.diagonal())
    bias = np.mean(predicted, axis=0) - 1.0
    assert np.all(bias > 0) and bias.max() < 0.05

    assert_moments(draws, mean_np, np.sqrt(cov_np.diagonal()), bias)


# ------------------------------------------------------------------------------------ 3. state_dict round trip
def make_two_group_sampler(seed):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DTYPE)
    named = list(model.named_parameters())
    opt = AdaptiveSGHMC(
        [
            {"params": [p for n, p in named if n.startswith("0.")], "param_names": [n for n, _ in named[:2]]},
            {"params": [p for n, p in named if n.startswith("2.")], "param_names": [n for n, _ in named[2:]],
             "prior_scale": 0.5, "temperature": 0.3,
             "prior_center": [torch.full_like(p, 0.1) for n, p in named if n.startswith("2.")]},
        ],
        lr=1e-3, num_data=100, prior_scale=2.0, seed=seed,
    )
    return model, opt


def closure_for(model, opt, gen):
    def closure():
        opt.zero_grad()
        x = torch.randn(8, 3, generator=gen, dtype=DTYPE)
        loss = ((model(x).squeeze(-1) - x.sum(-1)) ** 2).mean()
        loss.backward()
        return loss
    return closure


def test_state_dict_round_trip_reproduces_next_step():
    model, opt = make_two_group_sampler(seed=7)
    data_gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        opt.step(closure_for(model, opt, data_gen))

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "data": data_gen.get_state()}, buffer)
    snapshot = opt.state_dict()
    velocity_before = snapshot["state"][0]["velocity"].clone()

    opt.step(closure_for(model, opt, data_gen))
    expected = [p.detach().clone() for p in model.parameters()]
    # a state_dict taken earlier is not changed by later steps
    assert torch.equal(snapshot["state"][0]["velocity"], velocity_before)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as a resumed driver loads it
    model2, opt2 = make_two_group_sampler(seed=123)  # another seed: only the loaded generator can match
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    data_gen2 = torch.Generator().manual_seed(0)
    data_gen2.set_state(saved["data"])
    opt2.step(closure_for(model2, opt2, data_gen2))
    for got, want in zip(model2.parameters(), expected, strict=True):
        assert torch.equal(got, want)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(opt.state[p]["velocity"], opt2.state[p2]["velocity"])
        assert torch.equal(opt.state[p]["m2_max"], opt2.state[p2]["m2_max"])
        assert opt.state[p]["step"] == opt2.state[p2]["step"] == 6

    # the same optimizer loaded back also repeats the step
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    data_gen.set_state(saved["data"])
    opt.step(closure_for(model, opt, data_gen))
    for got, want in zip(model.parameters(), expected, strict=True):
        assert torch.equal(got, want)


def test_load_requires_generator_state():
    _, opt = make_two_group_sampler(seed=1)
    state = opt.state_dict()
    del state["generator_state"]
    with pytest.raises(KeyError, match="generator_state"):
        opt.load_state_dict(state)


def test_generator_state_matters():
    """Without restoring the generator the next step differs: the round-trip test above can fail."""
    model, opt = make_two_group_sampler(seed=7)
    model2, opt2 = make_two_group_sampler(seed=8)
    gen, gen2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    opt.step(closure_for(model, opt, gen))
    opt2.step(closure_for(model2, opt2, gen2))
    assert not torch.equal(model[0].weight, model2[0].weight)


# ------------------------------------------------------------------------------------------- 4. temperature 0
def test_temperature_zero_is_deterministic_heavy_ball():
    """No noise: different seeds agree bit for bit, and equal a hand-written preconditioned heavy ball."""
    a = torch.logspace(-2, 2, 6, dtype=DTYPE)
    target = torch.linspace(-1.0, 1.0, 6, dtype=DTYPE)
    lr, friction, beta2, eps, n_data = 0.1, 0.05, 0.9, 1e-8, 3.0
    scale, centre = 4.0, torch.full((6,), 0.25, dtype=DTYPE)

    def run(seed, n_steps):
        theta = torch.nn.Parameter(torch.zeros(6, dtype=DTYPE))
        opt = AdaptiveSGHMC([{"params": [theta], "prior_center": [centre]}], lr=lr, num_data=n_data,
                            temperature=0.0, friction=friction, prior_scale=scale, beta2=beta2, eps=eps, seed=seed)
        for _ in range(n_steps):
            theta.grad = a * (theta.detach() - target)  # mean NLL gradient
            opt.step()
        return theta.detach()

    assert torch.equal(run(0, 40), run(12345, 40))

    # by hand (numpy, Adam's raw EMA with bias correction)
    a_np, t_np, c_np = a.numpy(), target.numpy(), centre.numpy()
    theta, v = np.zeros(6), np.zeros(6)
    raw, m_max = np.zeros(6), np.zeros(6)
    for t in range(1, 41):
        g = n_data * a_np * (theta - t_np) + (theta - c_np) / scale**2
        raw = beta2 * raw + (1 - beta2) * g**2
        m_max = np.maximum(m_max, raw / (1 - beta2**t))
        v = (1 - friction) * v - lr * g / (np.sqrt(m_max) + eps)
        theta = theta + v
    np.testing.assert_allclose(run(0, 40).numpy(), theta, rtol=1e-10, atol=1e-14)

    # converges to the minimum of U (likelihood and prior together), curvatures over four decades
    minimum = (n_data * a_np * t_np + c_np / scale**2) / (n_data * a_np + 1 / scale**2)
    np.testing.assert_allclose(run(0, 3000).numpy(), minimum, rtol=0, atol=1e-10)


def test_temperature_zero_draws_no_noise():
    theta = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))
    opt = AdaptiveSGHMC([theta], lr=0.1, num_data=1, temperature=0.0, seed=0)
    before = opt.state_dict()["generator_state"]
    theta.grad = torch.ones(3, dtype=DTYPE)
    opt.step()
    assert torch.equal(opt.state_dict()["generator_state"], before)


# ------------------------------------------------------------------------------------ 5. frozen preconditioner
def test_frozen_preconditioner_is_frozen():
    gen = torch.Generator().manual_seed(0)
    theta = torch.nn.Parameter(torch.zeros(50, dtype=DTYPE))
    opt = AdaptiveSGHMC([theta], lr=1e-3, num_data=10, seed=0)
    for _ in range(20):
        theta.grad = torch.randn(50, generator=gen, dtype=DTYPE)
        opt.step()
    p_before = opt.preconditioner(theta)
    theta.grad = 10.0 * torch.randn(50, generator=gen, dtype=DTYPE)
    opt.step()
    assert not torch.equal(opt.preconditioner(theta), p_before)  # it adapts before freezing
    assert not opt.preconditioner_frozen

    opt.freeze_preconditioner()
    assert opt.preconditioner_frozen
    frozen = opt.preconditioner(theta)
    m2, m2_max = opt.state[theta]["m2"].clone(), opt.state[theta]["m2_max"].clone()
    for i in range(200):
        scale = 1e6 if i % 2 else 1e-6
        theta.grad = scale * torch.randn(50, generator=gen, dtype=DTYPE)
        opt.step()
        assert torch.equal(opt.preconditioner(theta), frozen)
    assert torch.equal(opt.state[theta]["m2"], m2) and torch.equal(opt.state[theta]["m2_max"], m2_max)

    # the flag travels with the state_dict
    theta2 = torch.nn.Parameter(theta.detach().clone())
    opt2 = AdaptiveSGHMC([theta2], lr=1e-3, num_data=10, seed=1)
    assert not opt2.preconditioner_frozen
    opt2.load_state_dict(opt.state_dict())
    assert opt2.preconditioner_frozen
    theta2.grad = 1e3 * torch.ones(50, dtype=DTYPE)
    opt2.step()
    assert torch.equal(opt2.preconditioner(theta2), frozen)


def test_freeze_before_first_step_is_plain_sghmc():
    theta = torch.nn.Parameter(torch.zeros(4, dtype=DTYPE))
    opt = AdaptiveSGHMC([theta], lr=1e-2, num_data=1, temperature=0.0, friction=1.0)
    opt.freeze_preconditioner()
    theta.grad = torch.tensor([1.0, 2.0, -3.0, 0.0], dtype=DTYPE)
    opt.step()
    assert torch.equal(opt.preconditioner(theta), torch.ones(4, dtype=DTYPE))
    assert torch.equal(theta.detach(), -1e-2 * torch.tensor([1.0, 2.0, -3.0, 0.0], dtype=DTYPE))
    # a group added after freezing starts frozen too
    extra = torch.nn.Parameter(torch.zeros(2, dtype=DTYPE))
    opt.add_param_group({"params": [extra]})
    assert opt.preconditioner_frozen


def test_first_step_preconditioner_is_seeded():
    """P at the first step is 1 / (|g| + eps): no 1/eps kick from an empty second moment."""
    theta = torch.nn.Parameter(torch.zeros(3, dtype=DTYPE))
    opt = AdaptiveSGHMC([theta], lr=1e-2, num_data=1, seed=0)
    g = torch.tensor([1e-3, 1.0, 1e3], dtype=DTYPE)
    theta.grad = g.clone()
    opt.step()
    assert torch.equal(opt.state[theta]["m2"], g * g)
    assert torch.equal(opt.preconditioner(theta), 1.0 / (g.abs() + 1e-8))
    kick = torch.sqrt(2 * 0.05 * 1e-2 * opt.preconditioner(theta))  # noise std with the seeded P (<= 1)
    assert torch.all(theta.detach().abs() < 1e-2 + 5 * kick)


# ------------------------------------------------------------------------------------------------- 6. prior
def test_prior_only_samples_prior_per_group():
    """Zero likelihood gradient: each group samples N(centre, T s²) with its own lr, scale, centre, T."""
    n_chains, friction = 256, 0.05
    # (scale, centre, temperature, lr); P ≈ 0.8 s / sqrt(T), so h = lr P / (T s²) ≈ 0.01, bias ≈ 0.3 %
    groups = [
        (0.3, torch.tensor([1.5, -0.5], dtype=DTYPE), 1.0, 4e-3),
        (2.0, torch.tensor([-3.0, 4.0], dtype=DTYPE), 0.5, 9e-3),
    ]
    params = [torch.nn.Parameter(c.repeat(n_chains, 1) + s) for s, c, _, _ in groups]
    opt = AdaptiveSGHMC(
        [{"params": [p], "prior_scale": s, "prior_center": [c.expand(n_chains, 2)], "temperature": t, "lr": lr}
         for p, (s, c, t, lr) in zip(params, groups, strict=True)],
        lr=1.0, num_data=1000, friction=friction, seed=4,
    )

    def set_grad():
        for p in params:
            p.grad = torch.zeros_like(p)

    x = run_chains(opt, set_grad, lambda: torch.cat([p.detach() for p in params], dim=1), 1000, 500, 4000)
    mu = torch.cat([c for _, c, _, _ in groups]).numpy()
    sd = np.repeat([s * np.sqrt(t) for s, _, t, _ in groups], 2)
    lrs = np.repeat([lr for *_, lr in groups], 2)
    precond = torch.cat([opt.preconditioner(p) for p in params], dim=1).numpy()
    bias = gaussian_variance_ratio(lrs * precond / sd**2, friction).mean(axis=0) - 1.0
    assert bias.max() < 0.01
    assert_moments(x, mu, sd, bias)


# -------------------------------------------------------------------------------------------- 7. NaN and inf
def test_nan_gradient_names_the_parameter():
    model = torch.nn.Linear(2, 1).to(DTYPE)
    opt = AdaptiveSGHMC(model.named_parameters(), lr=1e-3, num_data=10, prior_scale=1.0)
    model.weight.grad = torch.tensor([[0.1, float("nan")]], dtype=DTYPE)
    model.bias.grad = torch.tensor([0.2], dtype=DTYPE)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match=r"'weight'.*1 non-finite"):
        opt.step()
    for p, b in zip(model.parameters(), before, strict=True):  # nothing moved
        assert torch.equal(p, b)
    assert len(opt.state) == 0


def test_inf_gradient_unnamed_parameter():
    a = torch.nn.Parameter(torch.zeros(2, dtype=DTYPE))
    b = torch.nn.Parameter(torch.zeros(3, dtype=DTYPE))
    opt = AdaptiveSGHMC([a, b], lr=1e-3, num_data=10)
    a.grad = torch.zeros(2, dtype=DTYPE)
    b.grad = torch.tensor([0.0, float("inf"), -float("inf")], dtype=DTYPE)
    with pytest.raises(FloatingPointError, match=r"param_groups\[0\]\['params'\]\[1\].*2 non-finite"):
        opt.step()


# ------------------------------------------------------------------------------------------ hyper-parameters
@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0.0), dict(num_data=0), dict(temperature=-1.0), dict(friction=0.0), dict(friction=1.5),
     dict(prior_scale=0.0), dict(beta2=1.0), dict(eps=0.0), dict(lr=float("inf"))],
)
def test_invalid_hyperparameters(kwargs):
    values = dict(lr=1e-3, num_data=10) | kwargs
    with pytest.raises(ValueError, match="AdaptiveSGHMC"):
        AdaptiveSGHMC([torch.nn.Parameter(torch.zeros(2))], **values)


def test_prior_center_must_align():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="list of 2 tensors"):
        AdaptiveSGHMC([{"params": [p, q], "prior_center": [torch.zeros(2)]}], lr=1e-3, num_data=1)
    with pytest.raises(ValueError, match="shape"):
        AdaptiveSGHMC([{"params": [p, q], "prior_center": [torch.zeros(2), torch.zeros(2)]}], lr=1e-3, num_data=1)


def test_hyperparameters_live_in_param_groups():
    opt = AdaptiveSGHMC([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, num_data=10, prior_scale=0.5)
    group = opt.param_groups[0]
    for key in ("lr", "num_data", "temperature", "friction", "prior_scale", "prior_center", "beta2", "eps",
                "adapt_preconditioner"):
        assert key in group
    assert group["num_data"] == 10 and group["prior_scale"] == 0.5 and group["prior_center"] is None


def test_several_starts_put_mass_in_both_modes_and_one_start_stays_in_one():
    """Two Gaussians (means ±3, sd 0.5, equal mass) behind a barrier of 18 nats: each start (a noise-free
    descent from its own random initialisation, then adaptive SGHMC at T = 1) samples the mode it fell into
    and never crosses; the starts pooled with equal weight per start put mass in both modes, in proportion
    (half each, within the binomial spread of the starts' modes), and each mode's draws have its moments."""
    mu, sd, n_starts = 3.0, 0.5, 64
    theta = torch.nn.Parameter(torch.randn(n_starts, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
                               * 1.5)
    opt = AdaptiveSGHMC([theta], lr=1e-3, num_data=1, friction=0.05, temperature=0.0, seed=1)

    def set_grad():  # U = -log(½ N(-μ, sd²) + ½ N(μ, sd²)), each coordinate its own start
        x = theta.detach()
        log_left, log_right = -((x + mu) ** 2), -((x - mu) ** 2)
        right = torch.sigmoid((log_right - log_left) / (2 * sd**2))  # responsibility of the right mode
        theta.grad = (x - (2 * right - 1) * mu) / sd**2

    for _ in range(1500):  # the fits: noise-free, preconditioner adapting
        set_grad()
        opt.step()
    opt.freeze_preconditioner()
    for group in opt.param_groups:
        group["temperature"] = 1.0
    draws = []
    for step in range(8000):
        set_grad()
        opt.step()
        if step >= 1000 and step % 10 == 0:
            draws.append(theta.detach().clone())
    x = torch.stack(draws, dim=1).numpy()  # (start, draw)
    side = np.sign(x)
    assert np.all(side == side[:, :1])  # every start stays in its mode: one start samples one basin
    right = side[:, 0] > 0
    weights = np.full(x.shape, 1.0 / x.size)  # equal weight per start, each start's draws equally
    mass_right = weights[right].sum()
    assert 0 < mass_right < 1  # the pool has both modes
    assert abs(mass_right - 0.5) < 3 * np.sqrt(0.25 / n_starts)
    for in_mode, centre in ((right, mu), (~right, -mu)):
        y = x[in_mode]
        assert abs(y.mean() - centre) < 0.05
        assert abs(y.std() / sd - 1) < 0.1
