r"""Stochastic-gradient Hamiltonian Monte Carlo with a diagonal preconditioner adapted during burn-in.

The kernel (this module) is separate from the driver (burn-in length, thinning, chains, sample collection live
outside the update, as in BlackJAX): :class:`AdaptiveSGHMC` is a ``torch.optim.Optimizer`` whose ``step``
moves the parameters by one SGHMC step, and the math is in pure functions that a test can drive on a Gaussian.

Target and potential
--------------------
With N training data, a prior p(θ) and a likelihood p(y_i | θ), the posterior is ∝ exp(-U(θ)) with

    U(θ) = -log p(θ) - Σ_i log p(y_i | θ)  ≈  -log p(θ) - N · mean_{i ∈ batch} log p(y_i | θ),

the minibatch estimate being unbiased (the explicit ``N · mean minibatch log-likelihood`` of BlackJAX). The
optimizer receives in ``p.grad`` the gradient of the **mean minibatch negative log-likelihood per datum**,
i.e. what ``loss.backward()`` of a training loop gives when ``loss`` is that mean, and forms

    ∇U = num_data · p.grad + ∇(-log p(θ)),      ∇(-log p(θ)) = (θ - c) / s²

for a Gaussian prior N(c, s² I) per parameter group (``prior_scale`` s; ``prior_center`` c, zero by default;
``prior_scale=None`` is a flat prior, no prior term). If the loss is a *sum* over the batch, or is weighted,
``num_data`` must be changed to match: ``num_data · p.grad`` has to estimate the full-data gradient.
With ``temperature`` T the chain samples ∝ exp(-U(θ) / T) (T = 1: the posterior; T < 1: a "cold" posterior;
T = 0: no noise, an optimiser).

The update
----------
With velocity v, step η, friction per step α, diagonal preconditioner P and ξ ~ N(0, I),

    v ← (1 - α) v - η P ∇U + sqrt(2 α η P T) ξ,
    θ ← θ + v,

the SGHMC SDE (Chen, Fox, Guestrin 2014, eq. 13, mass P⁻¹, B̂ = 0) discretised; α = 1 is preconditioned SGLD.
On a Gaussian target of variance σ² the variance's discretisation bias is ≈ η P / (4 σ²), stable for
η P / σ² < 4 - 2α. The derivation, and the exact stationary variance the tests check, are in docs/sghmc.md.

The preconditioner
------------------
P = 1 / (sqrt(m̂2_max) + eps), with m̂2 the bias-corrected exponential moving average of the squared ∇U
(the second moment of Adam, Kingma & Ba 2015) and m̂2_max its running maximum (AMSGrad, Reddi et al. 2018), so
that P only decreases while it adapts. The estimate is seeded with the first squared gradient: it is
updated as m̂2 ← m̂2 + w_t (g² - m̂2) with w_t = (1 - β2) / (1 - β2^t), which is algebraically Adam's
m2 / (1 - β2^t) of a zero-started EMA, and w_1 = 1 gives m̂2 = g² exactly at the first step (a zero second
moment would make the first noise kick sqrt(2αη T / eps) huge). The count t is kept per element and starts at
an element's first non-zero gradient: an element whose gradient has been exactly zero so far (a per-element
parameter of an element absent from the minibatches, at its prior centre) has P = 0 and does not move, and
its first non-zero gradient seeds its m̂2 (without this, P = 1 / eps would send it flying). An element never
seen by the end of burn-in keeps P = 0: it stays where it started. Because of the
running maximum, large gradients early in burn-in (a chain started far from the mode) keep P small for good:
a valid but slowly mixing chain; start from a MAP estimate.

A preconditioner that keeps adapting makes the chain sample a biased law (the mass matrix depends on the
history). Call :meth:`AdaptiveSGHMC.freeze_preconditioner` at the end of burn-in: from then on P is fixed and
the chain is a valid SGHMC with constant diagonal mass matrix P⁻¹. Freezing before the first step gives plain
SGHMC with P = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "AdaptiveSGHMC",
    "potential_gradient",
    "preconditioner_from_moment",
    "sghmc_update_",
    "update_second_moment",
]


def potential_gradient(
    grad_mean_nll: Tensor,
    param: Tensor,
    num_data: float,
    prior_scale: float | None = None,
    prior_center: Tensor | None = None,
) -> Tensor:
    """∇U = num_data · ∇(mean minibatch NLL per datum) + (θ - c) / s².

    Args:
        grad_mean_nll: gradient of the mean minibatch negative log-likelihood per datum (``p.grad``).
        param: the parameter θ.
        num_data: N, the number of training data the mean is scaled up to.
        prior_scale: standard deviation s of the Gaussian prior N(c, s²); None for a flat prior.
        prior_center: centre c of the prior, same shape as ``param``; None for zero.

    Returns:
        ∇U, a new tensor of the shape of ``param``.
    """
    grad = grad_mean_nll * num_data
    if prior_scale is not None:
        precision = 1.0 / (prior_scale * prior_scale)
        grad.add_(param, alpha=precision)
        if prior_center is not None:
            grad.sub_(prior_center, alpha=precision)
    return grad


def update_second_moment(
    m2: Tensor, m2_max: Tensor, grad_u: Tensor, step: int | Tensor, beta2: float
) -> tuple[Tensor, Tensor]:
    """One adaptation step of the bias-corrected second moment and its running maximum.

    Args:
        m2: bias-corrected estimate m̂2 of E[(∇U)²] after ``step - 1`` gradients (anything at ``step == 1``).
        m2_max: running maximum of m̂2 (zeros at ``step == 1``).
        grad_u: the gradient ∇U of this step.
        step: 1-based number of gradients seen, this one included: one number, or one per element (0: not
            seen yet, the element's m̂2 stays as it is).
        beta2: EMA decay.

    Returns:
        ``(m2, m2_max)``: m̂2 + w (g² - m̂2) with w = (1 - β2) / (1 - β2^step) (w = 1 at step 1, so m̂2 = g²
        exactly), and max(m2_max, m̂2). New tensors.
    """
    if isinstance(step, int):
        weight = (1.0 - beta2) / (1.0 - beta2**step) if step > 0 else 0.0
    else:
        step = torch.as_tensor(step, dtype=grad_u.dtype, device=grad_u.device)
        weight = torch.where(step > 0, (1.0 - beta2) / (1.0 - beta2 ** step.clamp(min=1)), 0.0)
    m2 = torch.lerp(m2, grad_u * grad_u, weight)
    return m2, torch.maximum(m2_max, m2)


def preconditioner_from_moment(m2_max: Tensor, eps: float, seen: Tensor | None = None) -> Tensor:
    """P = 1 / (sqrt(m̂2_max) + eps), the diagonal of the inverse mass matrix; 0 where ``seen`` (the
    per-element count of :func:`update_second_moment`) is 0."""
    precond = 1.0 / (m2_max.sqrt() + eps)
    return precond if seen is None else torch.where(seen > 0, precond, 0.0)


def sghmc_update_(
    param: Tensor,
    velocity: Tensor,
    grad_u: Tensor,
    precond: Tensor,
    lr: float,
    friction: float,
    temperature: float,
    noise: Tensor | None = None,
    sqrt_precond: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One SGHMC step in velocity form (derivation in the module docstring), in place.

    v ← (1 - α) v - η P ∇U + sqrt(2 α η T) sqrt(P) ξ;  θ ← θ + v.

    Args:
        param: θ, updated in place.
        velocity: v (the momentum, in units of θ per step), updated in place.
        grad_u: ∇U at θ.
        precond: P, the diagonal preconditioner (inverse mass), same shape as θ.
        lr: η, the step.
        friction: α in (0, 1], the fraction of the velocity lost per step.
        temperature: T >= 0.
        noise: ξ ~ N(0, I) of the shape of θ; required when ``temperature > 0``, ignored when it is 0.
        sqrt_precond: sqrt(P), if the caller keeps it (P changes only while it adapts); computed if None.

    Returns:
        ``(param, velocity)``, the same tensors, updated.
    """
    velocity.mul_(1.0 - friction).addcmul_(precond, grad_u, value=-lr)
    if temperature > 0:
        if noise is None:
            raise ValueError("sghmc_update_ needs noise when temperature > 0")
        if sqrt_precond is None:
            sqrt_precond = precond.sqrt()
        velocity.addcmul_(sqrt_precond, noise, value=math.sqrt(2.0 * friction * lr * temperature))
    param.add_(velocity)
    return param, velocity


class AdaptiveSGHMC(Optimizer):
    r"""SGHMC with a per-parameter diagonal preconditioner, adapted (AMSGrad-style) until frozen.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                  \\
            &\textbf{input}: \theta_0 \text{ (params)},\ \eta \text{ (lr)},\ N \text{ (num\_data)},
                \ T \text{ (temperature)},\ \alpha \text{ (friction)},                            \\
            &\hspace{13mm} s \text{ (prior\_scale)},\ c \text{ (prior\_center)},
                \ \beta_2 \text{ (beta2)},\ \epsilon \text{ (eps)}                                 \\
            &\textbf{initialize}: v_0 \leftarrow 0,\ \hat m_0 \leftarrow 0,
                \ \hat m^{\max}_0 \leftarrow 0,\ P_0 \leftarrow 1                                  \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                  \\
            &\textbf{for}\: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                           \\
            &\hspace{5mm} g_t \leftarrow N\,\nabla_\theta \overline{\ell}_t(\theta_{t-1})
                + (\theta_{t-1} - c) / s^2
                \hspace{8mm} \overline{\ell}_t: \text{mean minibatch NLL per datum}                \\
            &\hspace{5mm} \textbf{if}\: g_t \text{ not finite}: \textbf{raise}
                \text{ FloatingPointError}                                                        \\
            &\hspace{5mm} \textbf{if}\: \text{adapting}:                                          \\
            &\hspace{10mm} \hat m_t \leftarrow \hat m_{t-1} + \frac{1-\beta_2}{1-\beta_2^t}
                (g_t^2 - \hat m_{t-1})                                                            \\
            &\hspace{10mm} \hat m^{\max}_t \leftarrow \max(\hat m^{\max}_{t-1}, \hat m_t)        \\
            &\hspace{10mm} P_t \leftarrow 1 / (\sqrt{\hat m^{\max}_t} + \epsilon)                 \\
            &\hspace{5mm} \textbf{else}: P_t \leftarrow P_{t-1}                                   \\
            &\hspace{5mm} \xi_t \sim \mathcal{N}(0, I) \text{ (only if } T > 0)                    \\
            &\hspace{5mm} v_t \leftarrow (1 - \alpha) v_{t-1} - \eta P_t g_t
                + \sqrt{2 \alpha \eta P_t T}\, \xi_t                                              \\
            &\hspace{5mm} \theta_t \leftarrow \theta_{t-1} + v_t                                  \\
            &\rule{110mm}{0.4pt}                                                                  \\[-1.ex]
            &\bf{return} \: \theta_t                                                              \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                  \\[-1.ex]
       \end{aligned}

    All operations are element-wise. The derivation from the SGHMC SDE (mass matrix M = P⁻¹, friction
    C = α M / ε, η = ε², gradient-noise correction B̂ neglected), the scaling of the likelihood and the exact
    discretisation bias on a Gaussian are in the module docstring. At ``temperature=0`` no noise is drawn and
    the step is the preconditioned heavy-ball optimiser (momentum 1 - α), deterministic.

    Every hyper-parameter is a per-group entry of ``param_groups`` (so a partially Bayesian model can give
    its groups different priors, steps or temperatures): ``lr``, ``num_data``, ``temperature``, ``friction``,
    ``prior_scale``, ``prior_center`` (a list of tensors aligned with the group's ``params``, or None),
    ``beta2``, ``eps`` and ``adapt_preconditioner`` (set to False by :meth:`freeze_preconditioner`).
    Per-parameter state, created at a parameter's first step: ``velocity`` (v), ``m2`` (m̂2), ``m2_max``,
    ``precond`` (P), ``sqrt_precond`` (sqrt(P), kept while P is fixed), ``step`` and, while adapting,
    ``seen`` (per element: steps since its first non-zero gradient; one int while that is the same for every
    element). Parameters whose ``grad`` is None are skipped, as in torch's optimisers.

    Randomness comes from a ``torch.Generator`` owned by the optimizer (on the device of the first parameter);
    its state is saved by :meth:`state_dict` under ``"generator_state"`` and restored by
    :meth:`load_state_dict`, so that a resumed chain repeats the next step bit for bit. Noise is drawn
    parameter by parameter in ``param_groups`` order. A ``state_dict()`` is a snapshot that later steps do
    not change (it holds copies: the steps update the state tensors in place).

    Args:
        params: parameters or parameter groups (``model.named_parameters()`` also works; the names are then
            used in error messages).
        lr: step η. With the adapted P ≈ 1 / RMS(∇U), the drift η P ∇U moves each element by about η per
            step, so η is in the unit of the parameters; η P is the effective (Langevin) step of each element.
            With P = 1 (frozen before the first step) η is in units of θ² / U.
        num_data: N, the number of training data that the mean minibatch NLL in ``p.grad`` is scaled to.
        temperature: T; samples ∝ exp(-U / T). 1 is the posterior, 0 turns off the noise. Default 1.
        friction: α in (0, 1], velocity lost per step; 1 - α is the momentum. Default 0.05.
        prior_scale: standard deviation s of a Gaussian prior N(c, s² I), in the unit of the parameters;
            None (default) for a flat prior.
        beta2: decay of the moving average of (∇U)² during adaptation. Default 0.999.
        eps: added to sqrt(m̂2_max) in P = 1 / (sqrt(m̂2_max) + eps), in units of ∇U. Default 1e-8.
        seed: seed of the optimizer's generator. Default 0.

    Example:
        >>> theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        >>> sampler = AdaptiveSGHMC([theta], lr=1e-2, num_data=100, prior_scale=1.0, seed=1)
        >>> for _ in range(10):
        ...     sampler.zero_grad()
        ...     loss = ((theta - 1.0) ** 2).mean()   # mean NLL per datum of some minibatch
        ...     loss.backward()
        ...     sampler.step()
        >>> sampler.freeze_preconditioner()      # end of burn-in: P fixed from here on
        >>> sampler.preconditioner_frozen
        True
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: float,
        temperature: float = 1.0,
        friction: float = 0.05,
        prior_scale: float | None = None,
        beta2: float = 0.999,
        eps: float = 1e-8,
        seed: int = 0,
    ):
        defaults = dict(
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            friction=friction,
            prior_scale=prior_scale,
            prior_center=None,
            beta2=beta2,
            eps=eps,
            adapt_preconditioner=True,
        )
        _check_hyperparameters(defaults)
        super().__init__(params, defaults)
        first = self.param_groups[0]["params"][0]
        self._generator = torch.Generator(device=first.device)
        self._generator.manual_seed(seed)

    # ---------------------------------------------------------------------------------------- groups, state
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group)
        centres = group["prior_center"]
        if centres is not None:
            params = group["params"]
            if isinstance(centres, Tensor) or len(centres) != len(params):
                raise ValueError(
                    f"prior_center must be a list of {len(params)} tensors aligned with the group's params "
                    "(or None)"
                )
            checked = []
            for i, (p, c) in enumerate(zip(params, centres, strict=True)):
                c = torch.as_tensor(c, dtype=p.dtype, device=p.device).detach().clone()
                if c.shape != p.shape:
                    raise ValueError(
                        f"prior_center[{i}] has shape {tuple(c.shape)}, its parameter {tuple(p.shape)}"
                    )
                checked.append(c)
            group["prior_center"] = checked

    def state_dict(self) -> dict:
        """The base optimizer state (param_groups, per-parameter state) plus ``"generator_state"``.

        The result is a snapshot: later steps do not change it (the parameters themselves are not in it).
        """
        state = super().state_dict()
        # the base class returns the live per-parameter tensors, which each step updates in place: clone them
        state["state"] = {
            key: {name: value.clone() if isinstance(value, Tensor) else value for name, value in entry.items()}
            for key, entry in state["state"].items()
        }
        state["generator_state"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict`, the generator state included (required: a chain without it would not
        continue the same random sequence)."""
        state_dict = dict(state_dict)
        if "generator_state" not in state_dict:
            raise KeyError("state_dict has no 'generator_state': it was not made by AdaptiveSGHMC.state_dict()")
        generator_state = state_dict.pop("generator_state")
        super().load_state_dict(state_dict)
        # the loaded tensors may be the caller's own (same dtype and device); the steps update them in place
        for entry in self.state.values():
            for name, value in entry.items():
                if isinstance(value, Tensor):
                    entry[name] = value.clone()
        self._generator.set_state(generator_state)

    def reseed(self, seed: int) -> None:
        """Restart the noise sequence from ``seed`` (e.g. a new chain continuing from a shared burn-in)."""
        self._generator.manual_seed(seed)

    # ------------------------------------------------------------------------------------- preconditioner
    def freeze_preconditioner(self) -> None:
        """End adaptation for every group: P keeps its current value at every later step.

        Call it at the end of burn-in, before collecting samples. Groups added later start frozen (P = 1).
        """
        self.defaults["adapt_preconditioner"] = False
        for group in self.param_groups:
            group["adapt_preconditioner"] = False

    def thaw_preconditioner(self) -> None:
        """Adapt P again, from the moments it was frozen with (the running maximum kept: P can only shrink),
        until :meth:`freeze_preconditioner`: a warm start on data whose gradients the first burn-in never saw."""
        self.defaults["adapt_preconditioner"] = True
        for group in self.param_groups:
            group["adapt_preconditioner"] = True

    @property
    def preconditioner_frozen(self) -> bool:
        """True when no group adapts its preconditioner any more."""
        return not any(group["adapt_preconditioner"] for group in self.param_groups)

    def preconditioner(self, p: Tensor) -> Tensor:
        """A copy of the diagonal preconditioner P of parameter ``p`` (ones before its first step).

        ``lr * preconditioner(p)`` is the effective step of each element, and for a Gaussian posterior of
        variance σ² the discretisation bias of the variance is about ``lr * P / σ² / 4``.
        """
        state = self.state.get(p)
        if not state:
            return torch.ones_like(p)
        return state["precond"].clone()

    # ----------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One SGHMC step for every parameter with a gradient.

        Args:
            closure: optional callable that re-evaluates the loss (with its backward) and returns it.

        Returns:
            The closure's loss, or None.

        Raises:
            FloatingPointError: ∇U has a NaN or inf; no parameter or state has been changed then.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        work: list[tuple[dict, Tensor, Tensor, str]] = []
        for g_index, group in enumerate(self.param_groups):
            centres = group["prior_center"]
            names = group.get("param_names")
            for p_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaptiveSGHMC does not support sparse gradients")
                grad_u = potential_gradient(
                    p.grad,
                    p,
                    group["num_data"],
                    group["prior_scale"],
                    None if centres is None else centres[p_index],
                )
                label = f"param_groups[{g_index}]['params'][{p_index}]"
                if names is not None:
                    label = f"'{names[p_index]}' ({label})"
                work.append((group, p, grad_u, label))
        if not work:
            return loss
        # one reduction per parameter: a sum is finite exactly when no entry is NaN or inf, short of an
        # overflow of the sum itself, which the exact check below tells apart
        sums = torch.stack([g.sum() for _, _, g, _ in work])
        if not bool(torch.isfinite(sums).all()):
            for group, p, grad_u, label in work:
                bad = int((~torch.isfinite(grad_u)).sum())
                if bad:
                    raise FloatingPointError(
                        f"AdaptiveSGHMC: the gradient of the potential of parameter {label}, shape "
                        f"{tuple(p.shape)}, has {bad} non-finite entries (NaN or inf); stop the chain, the samples "
                        "taken so far are valid"
                    )

        for group, p, grad_u, _ in work:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["velocity"] = torch.zeros_like(p)
                state["m2"] = torch.zeros_like(p)
                state["m2_max"] = torch.zeros_like(p)
                state["precond"] = torch.ones_like(p)
            state["step"] += 1
            if group["adapt_preconditioner"]:
                # per element: steps since its first non-zero gradient (the module docstring's t); one number
                # while every element has been seen from the same step (the usual case), else a tensor
                seen = state.get("seen", state["step"] - 1)
                if isinstance(seen, int) and (seen > 0 or bool((grad_u != 0).all())):
                    seen += 1
                else:
                    if isinstance(seen, int):
                        seen = torch.full_like(p, seen)
                    seen = seen + ((grad_u != 0) | (seen > 0)).to(p.dtype)
                state["seen"] = seen
                state["m2"], state["m2_max"] = update_second_moment(
                    state["m2"], state["m2_max"], grad_u, seen, group["beta2"]
                )
                state["precond"] = preconditioner_from_moment(
                    state["m2_max"], group["eps"], None if isinstance(seen, int) else seen
                )
                state.pop("sqrt_precond", None)
            temperature = group["temperature"]
            noise = None
            if temperature > 0:
                if "sqrt_precond" not in state:
                    state["sqrt_precond"] = state["precond"].sqrt()
                # drawn in float32 whatever the parameters' dtype: its precision does not matter to the
                # sampler, and on a CPU a float64 normal draw costs 5x a float32 one (a scalar, not vector, path)
                noise = torch.randn(
                    p.shape, generator=self._generator, dtype=torch.float32, device=self._generator.device
                ).to(p.device, p.dtype)
            sghmc_update_(
                p,
                state["velocity"],
                grad_u,
                state["precond"],
                group["lr"],
                group["friction"],
                temperature,
                noise,
                state.get("sqrt_precond"),
            )
        return loss


def _check_hyperparameters(group: dict) -> None:
    """Raise ValueError for hyper-parameters outside their domain."""
    checks = [
        ("lr", group["lr"] > 0, "> 0"),
        ("num_data", group["num_data"] > 0, "> 0"),
        ("temperature", group["temperature"] >= 0, ">= 0"),
        ("friction", 0 < group["friction"] <= 1, "in (0, 1]"),
        ("prior_scale", group["prior_scale"] is None or group["prior_scale"] > 0, "> 0 or None"),
        ("beta2", 0 <= group["beta2"] < 1, "in [0, 1)"),
        ("eps", group["eps"] > 0, "> 0"),
    ]
    for name, ok, domain in checks:
        if not ok:
            raise ValueError(f"AdaptiveSGHMC: {name} must be {domain}, got {group[name]!r}")
    for name in ("lr", "num_data", "temperature", "friction", "beta2", "eps"):
        if not math.isfinite(group[name]):
            raise ValueError(f"AdaptiveSGHMC: {name} must be finite, got {group[name]!r}")
