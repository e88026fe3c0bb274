"""Mean-field Gaussian variational inference over the chosen (all, or partially Bayesian) parameters.

The variational family is q(θ) = Π_i N(θ_i; μ_i, σ_i²) over the stochastic parameters, σ = softplus(ρ); the
other parameters stay at the values the means start from (a MAP model). The objective, per datum, is::

    neg_elbo = E_q[ mean_minibatch NLL(θ) ] + kl_weight · KL(q ‖ prior) / N

with N the number of training structures, the expectation estimated with ``mc_samples`` reparameterised draws
θ = μ + σ ⊙ ε, ε ~ N(0, I), each evaluated through ``torch.func.functional_call``, and the KL to the Gaussian
prior (zero-centred or centred on pre-trained weights; :class:`~mlip_uq.inference.priors.GaussianPrior`) in
closed form. ``kl_weight`` = 1 is the ELBO; < 1 tempers the prior (a "cold" posterior).

The core is model-agnostic and written init/step/sample style: :func:`init_vi` makes a :class:`VIState`
(means, raw scales ρ, Adam state, RNG), :func:`vi_step` takes one optimiser step on any ``nn.Module`` whose
``forward`` takes the batch and any per-datum NLL function, :func:`sample_gaussian` draws K parameter sets.
:func:`fit` is the driver for the NequIP model (method ``vi``): means from a MAP model (a file, or a MAP phase
run by ``fit_map``), minibatches that are a pure function of (seed, step), checkpoints with ``--resume``, a
trace.

The posterior file stores the K draws used for evaluation as ordinary samples and the fitted Gaussian itself in
the groups ``/vi/mean`` and ``/vi/scale``, so that it can be sampled again at any K (:func:`resample`).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, Optional, Tuple, Union

import h5py
import numpy as np
import torch
from nequip.data import AtomicDataDict

from ..config import ConfigError, settings_from
from ..files import appending_csv, load_checkpoint, write_json
from ..model import ModelConfig, build_model
from ..posterior import Posterior, PosteriorFileError, load_posterior
from ..posterior.io import save_posterior
from .common import fit_map_once, minibatch, resolve_device, save_checkpoint
from .diagnostics import trace_drift
from .loss import LossWeights, neg_log_likelihood
from .map import MAPSettings, fit_posterior_noise_on_validation
from .options import PriorSettings, check_no_dropout, likelihood_options
from .priors import GaussianPrior, pretrained_weights, prior_from_spec, select_stochastic

log = logging.getLogger(__name__)

MEAN_GROUP, SCALE_GROUP = "vi/mean", "vi/scale"


@dataclass
class VISettings:
    """Settings of mean-field VI (steps are minibatch steps).

    Args:
        lr: Adam learning rate of the means and of the raw scales ρ (σ = softplus(ρ)).
        steps: optimiser steps.
        batch_size: structures per minibatch.
        mc_samples: reparameterised draws per step.
        kl_weight: factor on KL/N (1: the ELBO; < 1: tempered).
        init_scale: initial σ of every stochastic parameter (parameter units).
        n_samples: number K of draws stored as the posterior's samples for evaluation.
        stochastic: which parameters are variational: ``all``, ``{last_layers: N}`` or ``{patterns: [...]}``.
        init: a posterior file or checkpoint holding MAP weights for the means (and the fixed parameters),
            matched as SG-MCMC's ``init``; None: a MAP phase run by ``fit_map`` with the ``training`` settings.
        prior: ``{scale: s, layer_scales: {layer: s}, center: null | path}`` as for SG-MCMC.
        likelihood_weights: ``{energy, forces, stress}``, the power likelihood of SG-MCMC's option; all 1: the
            ELBO of the likelihood itself.
        noise_from_validation: fit every stored draw's learned noise stds on the validation split, each draw's
            alone and then one factor for all with their spread included, as SG-MCMC's option (the fitted
            Gaussian in ``/vi`` is kept as fitted).
        checkpoint_every: steps between checkpoints.
        trace_every: steps between trace rows.
        accelerator: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        training: the MAP phase's settings (the ``training`` section) when ``init`` is None; else None.
    """

    lr: float = 1e-3
    steps: int = 2000
    batch_size: int = 8
    mc_samples: int = 1
    kl_weight: float = 1.0
    init_scale: float = 1e-3
    n_samples: int = 20
    stochastic: Union[str, Dict] = "all"
    init: Optional[str] = None
    prior: PriorSettings = field(default_factory=PriorSettings)
    likelihood_weights: LossWeights = field(default_factory=LossWeights)
    noise_from_validation: bool = True
    checkpoint_every: int = 200
    trace_every: int = 10
    accelerator: str = "auto"
    training: Optional[MAPSettings] = None

    PATHS: ClassVar[Tuple[str, ...]] = ("vi.init", "vi.prior.center")

    @classmethod
    def from_dict(cls, config: Dict) -> "VISettings":
        """From a run configuration: the ``vi`` section (``prior``, ``stochastic`` parsed) and, when
        ``vi.init`` is not set, ``training`` for the MAP phase that initialises the means.

        Raises:
            ConfigError: a mistyped option; ``model.dropout``; ``vi.noise`` (the noise is the model's).
        """
        model = config.get("model", {})
        check_no_dropout(model, "vi")
        values = likelihood_options(config.get("vi"), "vi")
        if "training" in values:
            raise ConfigError("the MAP phase's settings go in the training section, not vi.training")
        settings = settings_from(cls, values, "vi")
        if not settings.init:
            settings.training = MAPSettings.from_dict(config.get("training"))
        return settings

    def __post_init__(self):
        if self.accelerator not in ("auto", "cpu", "cuda"):
            raise ValueError(f"vi.accelerator must be auto, cpu or cuda, got {self.accelerator!r}")
        if self.init_scale <= 0 or self.mc_samples < 1 or self.n_samples < 1 or self.kl_weight < 0:
            raise ValueError(f"vi: init_scale must be > 0, mc_samples and n_samples >= 1, kl_weight >= 0; got "
                             f"{self.init_scale}, {self.mc_samples}, {self.n_samples}, {self.kl_weight}")


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """ρ with softplus(ρ) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


class VIState:
    """The named state of mean-field VI.

    Attributes:
        means: μ by parameter name (leaf tensors that require grad).
        raw_scales: ρ by parameter name; σ = softplus(ρ).
        optimizer: Adam over means and raw scales.
        generator: the RNG of the reparameterisation noise.
        step: optimiser steps taken.
    """

    def __init__(self, means: Dict[str, torch.Tensor], raw_scales: Dict[str, torch.Tensor], lr: float, seed: int):
        self.means, self.raw_scales = means, raw_scales
        self.optimizer = torch.optim.Adam([*means.values(), *raw_scales.values()], lr=lr)
        device = next(iter(means.values())).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.step = 0

    def scales(self) -> Dict[str, torch.Tensor]:
        """σ = softplus(ρ) by name."""
        return {n: torch.nn.functional.softplus(r) for n, r in self.raw_scales.items()}

    def state_dict(self) -> Dict:
        """Plain tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "means": {n: t.detach().clone() for n, t in self.means.items()},
            "raw_scales": {n: t.detach().clone() for n, t in self.raw_scales.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
        }

    def load_state_dict(self, state: Dict) -> None:
        with torch.no_grad():
            for n, t in self.means.items():
                t.copy_(state["means"][n])
            for n, t in self.raw_scales.items():
                t.copy_(state["raw_scales"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])


def init_vi(means: Dict[str, torch.Tensor], init_scale: float, lr: float, seed: int) -> VIState:
    """A VI state with q centred on ``means`` (copied) and σ = ``init_scale`` everywhere."""
    mu = {n: t.detach().clone().requires_grad_(True) for n, t in means.items()}
    rho = {n: softplus_inverse(torch.full_like(t, init_scale)).requires_grad_(True) for n, t in mu.items()}
    return VIState(mu, rho, lr, seed)


def kl_divergence(means: Dict[str, torch.Tensor], scales: Dict[str, torch.Tensor], prior: GaussianPrior) -> torch.Tensor:
    """KL(q ‖ prior) in nats: Σ_i log(s_i/σ_i) + (σ_i² + (μ_i − c_i)²) / (2 s_i²) − 1/2."""
    total = 0.0
    for n, mu in means.items():
        s, c, sigma = prior.scale_of(n), prior.center_of(n, mu), scales[n]
        total = total + (math.log(s) - torch.log(sigma) + (sigma**2 + (mu - c) ** 2) / (2 * s**2) - 0.5).sum()
    return torch.as_tensor(total)


NLL = Callable[[object, object], torch.Tensor]  # (model output, batch) -> per-datum NLL (B,)


def neg_elbo(state: VIState, model: torch.nn.Module, batch, nll: NLL, num_data: int, prior: GaussianPrior,
             mc_samples: int = 1, kl_weight: float = 1.0) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The negative ELBO per datum (module docstring) and its parts ``nll`` (per datum) and ``kl`` (nats, total).

    ``model(batch)`` is evaluated with the drawn parameters through ``torch.func.functional_call``; parameters
    of ``model`` that are not in ``state.means`` keep their values.
    """
    scales = state.scales()
    data_term = 0.0
    for _ in range(mc_samples):
        params = {n: mu + scales[n] * torch.randn(mu.shape, generator=state.generator, dtype=mu.dtype,
                                                  device=mu.device) for n, mu in state.means.items()}
        out = torch.func.functional_call(model, params, (batch,), strict=False)
        data_term = data_term + nll(out, batch).mean()
    data_term = data_term / mc_samples
    kl = kl_divergence(state.means, scales, prior)
    return data_term + kl_weight * kl / num_data, {"nll": float(data_term.detach()), "kl": float(kl.detach())}


def vi_step(state: VIState, model: torch.nn.Module, batch, nll: NLL, num_data: int, prior: GaussianPrior,
            mc_samples: int = 1, kl_weight: float = 1.0) -> Dict[str, float]:
    """One Adam step on the negative ELBO; returns ``neg_elbo``, ``nll`` and ``kl`` of the step.

    Raises:
        FloatingPointError: the objective is NaN or infinite (the state is left unchanged).
    """
    state.optimizer.zero_grad(set_to_none=True)
    loss, terms = neg_elbo(state, model, batch, nll, num_data, prior, mc_samples, kl_weight)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the negative ELBO is {loss.item()} at step {state.step}")
    loss.backward()
    state.optimizer.step()
    state.step += 1
    return {"neg_elbo": loss.item(), **terms}


def sample_gaussian(means: Dict[str, torch.Tensor], scales: Dict[str, torch.Tensor], n_samples: int,
                    seed: int) -> Dict[str, torch.Tensor]:
    """K draws μ + σ ⊙ ε by name, shape (K, ...), from a ``torch.Generator`` seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for n, mu in means.items():
        eps = torch.randn((n_samples, *mu.shape), generator=generator, dtype=mu.dtype)
        out[n] = mu.detach().cpu() + scales[n].detach().cpu() * eps
    return out


def posterior_from_gaussian(config: ModelConfig, shared: Dict[str, torch.Tensor], means: Dict[str, torch.Tensor],
                            scales: Dict[str, torch.Tensor], n_samples: int, seed: int, **metadata) -> Posterior:
    """A posterior of K draws from the mean-field Gaussian (stochastic tensors) plus the ``shared`` tensors."""
    return Posterior(config, dict(shared), sample_gaussian(means, scales, n_samples, seed), **metadata)


def save_vi_posterior(posterior: Posterior, means: Dict[str, torch.Tensor], scales: Dict[str, torch.Tensor],
                      path) -> None:
    """Write ``posterior`` with the fitted Gaussian in ``/vi/mean`` and ``/vi/scale`` (atomically)."""
    save_posterior(posterior, path, extra_groups={
        MEAN_GROUP: {n: t.detach() for n, t in means.items()},
        SCALE_GROUP: {n: t.detach() for n, t in scales.items()},
    })


def load_gaussian(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The fitted (means, scales) stored in a VI posterior file."""
    with h5py.File(path, "r") as f:
        if MEAN_GROUP not in f or SCALE_GROUP not in f:
            raise PosteriorFileError(f"{path} holds no fitted Gaussian (groups /{MEAN_GROUP}, /{SCALE_GROUP}): "
                                     "not a VI posterior")
        return tuple({n: torch.from_numpy(np.asarray(d[()])) for n, d in f[g].items()} for g in (MEAN_GROUP, SCALE_GROUP))


def resample(path, n_samples: int, seed: int) -> Posterior:
    """The VI posterior in ``path`` with ``n_samples`` fresh draws (seed ``seed``) from its stored Gaussian; the
    shared tensors, calibration and metadata are the file's."""
    post = load_posterior(path)
    means, scales = load_gaussian(path)
    hyper = {**post.hyperparameters, "n_samples": n_samples, "sample_seed": seed}
    return post.replace(samples=sample_gaussian(means, scales, n_samples, seed), hyperparameters=hyper)


_TRACE_FIELDS = ["step", "neg_elbo", "nll", "kl", "median_scale"]

Settings = VISettings


def fit(context) -> Posterior:
    """Method ``vi``: fit the mean-field Gaussian of the stochastic parameters and write ``posterior.h5``.

    Files in ``context.out_dir``: ``map/`` (the MAP phase, when ``settings.init`` is None), ``vi/vi.ckpt``
    (checkpoint), ``vi/trace.csv``, ``vi/convergence.json`` (:func:`report_convergence`), ``posterior.h5``.
    With ``context.resume`` the fit continues from ``vi/vi.ckpt`` (and a finished or checkpointed MAP phase).
    N = ``len(context.train)`` in the KL weight; the validation graphs are used by the MAP phase only.

    Returns:
        The posterior: ``settings.n_samples`` draws (seed ``model_config.seed``) from the fitted Gaussian, the
        Gaussian itself in ``/vi/mean`` and ``/vi/scale``.
    """
    config, settings, train = context.model_config, context.settings, context.train
    out_dir = Path(context.out_dir)
    work = out_dir / "vi"
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(config)
    if settings.init:
        shapes = {n: t.shape for n, t in model.state_dict().items()}
        start = pretrained_weights(settings.init, list(shapes), shapes)
        missing = sorted(set(shapes) - set(start))
        if missing:
            raise ValueError(f"vi.init {settings.init} has no value for {missing}")
        model.load_state_dict(start)
    else:
        if settings.training is None:
            raise ValueError("vi.init is not set: the MAP phase needs the training settings")
        model.load_state_dict(fit_map_once(model, train, context.val, settings.training, out_dir / "map",
                                           seed=config.seed, resume=context.resume))
    stochastic = select_stochastic(model, settings.stochastic)
    prior = prior_from_spec(settings.prior, model, stochastic)
    device = resolve_device(settings.accelerator)
    model.to(device).train().requires_grad_(False)  # train mode: forces keep their graph for parameter gradients
    params = dict(model.named_parameters())
    state = init_vi({n: params[n] for n in stochastic}, settings.init_scale, settings.lr, seed=config.seed)
    checkpoint = work / "vi.ckpt"
    if context.resume and checkpoint.is_file():
        state.load_state_dict(load_checkpoint(checkpoint))
        log.info("VI resumed at step %d", state.step)
    _run(state, model, train, settings, prior, config.seed, work, device)
    report_convergence(work)
    scales = state.scales()
    shared = {n: t.detach().cpu().clone() for n, t in model.state_dict().items() if n not in stochastic}
    partial = len(stochastic) < len(params)
    posterior = posterior_from_gaussian(
        config, shared, state.means, scales, settings.n_samples, seed=config.seed, method="vi",
        hyperparameters={**asdict(settings), "partial": partial, "sample_seed": config.seed}, **context.metadata,
    )
    if settings.noise_from_validation and context.val:
        posterior = fit_posterior_noise_on_validation(posterior, context.val, settings.batch_size)
    save_vi_posterior(posterior, {n: t.cpu() for n, t in state.means.items()}, {n: t.cpu() for n, t in scales.items()},
                      context.posterior_path)
    return posterior


def report_convergence(work: Path) -> Dict:
    """Whether the fit converged: the drift of the negative ELBO and of the median scale between the last two
    fifths of ``work/trace.csv`` (:func:`~mlip_uq.inference.diagnostics.trace_drift`), written to
    ``work/convergence.json`` and logged, with a warning when either still moves."""
    rows = list(csv.DictReader((work / "trace.csv").open()))
    report: Dict = {"rows": len(rows)}
    if len(rows) >= 10:
        for key in ("neg_elbo", "median_scale"):
            report[key] = trace_drift([float(r[key]) for r in rows])
        report["flat"] = report["neg_elbo"]["flat"] and report["median_scale"]["flat"]
        text = ", ".join(f"{key} {report[key]['previous_mean']:.5g} -> {report[key]['last_mean']:.5g} "
                         f"({report[key]['change'] / max(report[key]['standard_error'], 1e-300):+.1f} s.e.)"
                         for key in ("neg_elbo", "median_scale"))
        (log.info if report["flat"] else log.warning)(
            "VI %s: between the last two fifths of the trace %s", "converged" if report["flat"] else
            "has not converged (more vi.steps, or another lr)", text)
    write_json(report, work / "convergence.json")
    return report


def _run(state: VIState, model, train, settings: VISettings, prior: GaussianPrior, seed: int,
         work: Path, device: torch.device) -> None:
    checkpoint = work / "vi.ckpt"
    start = time.perf_counter()

    def nll(out, batch):
        return neg_log_likelihood(out, batch, settings.likelihood_weights)

    with appending_csv(work / "trace.csv", _TRACE_FIELDS, "step", state.step) as writer:
        while state.step < settings.steps:
            step = state.step
            batch = AtomicDataDict.to_(minibatch(train, settings.batch_size, seed, step), device)
            terms = vi_step(state, model, batch, nll, len(train), prior, settings.mc_samples, settings.kl_weight)
            if step % settings.trace_every == 0:
                sigma = torch.cat([s.detach().flatten() for s in state.scales().values()])
                writer.writerow({"step": step, **terms, "median_scale": float(sigma.median())})
            if state.step % settings.checkpoint_every == 0 or state.step == settings.steps:
                save_checkpoint(state.state_dict(), checkpoint)
                log.info("VI step %d/%d  neg_elbo %.5g  nll %.5g  KL %.5g  (%.0f s)", state.step, settings.steps,
                         terms["neg_elbo"], terms["nll"], terms["kl"], time.perf_counter() - start)
