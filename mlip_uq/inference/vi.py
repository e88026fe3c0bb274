"""Mean-field Gaussian variational inference over the chosen (all, or partially Bayesian) parameters.

The variational family is q(θ) = Π_i N(θ_i; μ_i, σ_i²) over the stochastic parameters, σ = softplus(ρ); the
other parameters stay at the values the means start from (a MAP model). The objective, per datum, is::

    neg_elbo = E_q[ mean_minibatch NLL(θ) ] + kl_weight · KL(q ‖ prior) / N

with N the number of training structures, the expectation estimated with ``mc_samples`` reparameterised draws
θ = μ + σ ⊙ ε, ε ~ N(0, I), each evaluated through ``torch.func.functional_call``, and the KL to the Gaussian
prior (zero-centred or centred on pre-trained weights; :class:`~mlip_uq.inference.priors.GaussianPrior`) in
closed form. ``kl_weight`` = 1 is the ELBO; < 1 tempers the prior (a "cold" posterior).

The core is model-agnostic and written init/step/sample style: :func:`init_vi` makes a :class:`VIState`
(means, raw scales ρ, Adam state, RNG; the scales one number or per parameter, e.g. the mean-field Laplace
scales of :func:`fisher_scales`), :func:`vi_step` takes one optimiser step on any ``nn.Module`` whose
``forward`` takes the batch and any per-datum NLL function, :func:`sample_gaussian` draws K parameter sets.
:func:`fit` is the driver for the NequIP model (method ``vi``): means from a fresh initialisation or a MAP model
(a file, or a MAP phase run by ``fit_map``: ``init: map``), minibatches that are a pure function of (seed, step), checkpoints with ``--resume``, a
trace.

The posterior file stores the K draws used for evaluation as ordinary samples and the fitted Gaussian itself in
the groups ``/vi/mean`` and ``/vi/scale``, so that it can be sampled again at any K (:func:`resample`).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import h5py
import numpy as np
import torch
from nequip.data import AtomicDataDict

from ..files import appending_csv, load_checkpoint, write_json
from ..model import ModelConfig, build_model
from ..posterior import Posterior, PosteriorFileError, load_posterior
from ..posterior.io import save_posterior
from ..settings import FROM_MAP, ConfigError, settings_from
from . import Artifacts, FitContext, MapStart, trains_map_alike
from .common import fit_map_once, minibatch, resolve_device, save_checkpoint
from .diagnostics import trace_drift
from .loss import LossWeights, neg_log_likelihood
from .noise import fit_posterior_noise_on_validation
from .options import PriorSettings, check_no_dropout, likelihood_options, map_options
from .priors import GaussianPrior, pretrained_weights, prior_from_spec, select_stochastic
from .trainer import MAPSettings, training_curves

log = logging.getLogger(__name__)

MEAN_GROUP, SCALE_GROUP = "vi/mean", "vi/scale"
FISHER = "fisher"  # the init_scale that starts every σ at its mean-field Laplace value


@dataclass
class VISettings:
    """Settings of mean-field VI (steps are minibatch steps).

    Args:
        lr: Adam learning rate of the means.
        scale_lr: Adam learning rate of the raw scales ρ (σ = softplus(ρ)); None: ``lr``. Adam moves each ρ by
            at most about this much per step, and less where the gradient is noisy, so it sets how fast the
            scales can reach their optimum.
        steps: optimiser steps.
        batch_size: structures per minibatch.
        mc_samples: reparameterised draws per step.
        kl_weight: factor on KL/N (1: the ELBO; < 1: tempered).
        init_scale: initial σ of every stochastic parameter (parameter units), or ``fisher``: each parameter's
            mean-field Laplace scale at the means, (N·F_ii + 1/s_i²)^(-1/2) with F the diagonal empirical Fisher
            of the per-datum NLL, each label's term weighted once (:func:`fisher_scales`).
        fisher_structures: training structures (a seeded draw) whose gradients estimate F for ``fisher``.
        n_samples: number K of draws stored as the posterior's samples for evaluation.
        stochastic: which parameters are variational: ``all``, ``{last_layers: N}`` or ``{patterns: [...]}``.
        init: a posterior file or checkpoint holding MAP weights for the means (and the fixed parameters),
            matched as SG-MCMC's ``init``; ``map``: a MAP phase trained first in the same run by ``fit_map`` with
            the ``training`` settings (:data:`~mlip_uq.config.FROM_MAP`); None: a fresh initialisation (the run's
            seed), as SG-MCMC's.
        prior: ``{scale: s, layer_scales: {layer: s}, center: null | path | map}`` as for SG-MCMC.
        likelihood_weights: ``{energy, forces, stress}``, the power likelihood of SG-MCMC's option; all 1: the
            ELBO of the likelihood itself.
        noise_from_validation: fit every stored draw's learned noise stds on the validation split, each draw's
            alone and then one factor for all with their spread included, as SG-MCMC's option (the fitted
            Gaussian in ``/vi`` is kept as fitted).
        checkpoint_every: steps between checkpoints.
        trace_every: steps between trace rows.
        accelerator: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        training: the MAP phase's settings (the ``training`` section) when ``init`` or ``prior.center`` is
            ``map``; else None.
    """

    lr: float = 1e-3
    scale_lr: Optional[float] = None
    steps: int = 2000
    batch_size: int = 8
    mc_samples: int = 1
    kl_weight: float = 1.0
    init_scale: Union[float, str] = 1e-3
    fisher_structures: int = 256
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

    def uses_map(self) -> bool:
        """Whether the run starts by training its own MAP model (``init`` or ``prior.center`` is ``map``)."""
        return FROM_MAP in (self.init, self.prior.center)

    @classmethod
    def from_dict(cls, config: Dict) -> "VISettings":
        """From a run configuration: the ``vi`` section (``prior``, ``stochastic`` parsed) and, when
        ``vi.init`` or ``vi.prior.center`` is ``map``, ``training`` for the MAP phase.

        Raises:
            ConfigError: a mistyped option; ``model.dropout``; ``vi.noise`` (the noise is the model's).
        """
        model = config.get("model", {})
        check_no_dropout(model, "vi")
        values = likelihood_options(config.get("vi"), "vi")
        if "training" in values:
            raise ConfigError("the MAP phase's settings go in the training section, not vi.training")
        settings = settings_from(cls, values, "vi")
        if settings.uses_map():
            settings.training = MAPSettings.from_dict(config.get("training"))
        return settings

    def __post_init__(self):
        if self.accelerator not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"vi.accelerator must be auto, cpu or cuda, got {self.accelerator!r}")
        if self.init_scale != FISHER and not (isinstance(self.init_scale, (int, float)) and self.init_scale > 0):
            raise ConfigError(f"vi.init_scale must be a number > 0 or {FISHER!r}, got {self.init_scale!r}")
        if self.scale_lr is not None and self.scale_lr <= 0:
            raise ConfigError(f"vi.scale_lr must be > 0 or null (the means' lr), got {self.scale_lr}")
        if self.mc_samples < 1 or self.n_samples < 1 or self.kl_weight < 0 or self.fisher_structures < 1:
            raise ConfigError(f"vi: mc_samples, n_samples and fisher_structures must be >= 1, kl_weight >= 0; got "
                              f"{self.mc_samples}, {self.n_samples}, {self.fisher_structures}, {self.kl_weight}")


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """ρ with softplus(ρ) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


class VIState:
    """The named state of mean-field VI.

    Attributes:
        means: μ by parameter name (leaf tensors that require grad).
        raw_scales: ρ by parameter name; σ = softplus(ρ).
        optimizer: Adam over the means (at ``lr``) and the raw scales (at ``scale_lr``, else ``lr``).
        generator: the RNG of the reparameterisation noise.
        step: optimiser steps taken.
    """

    def __init__(self, means: Dict[str, torch.Tensor], raw_scales: Dict[str, torch.Tensor], lr: float, seed: int,
                 scale_lr: Optional[float] = None):
        self.means, self.raw_scales = means, raw_scales
        self.optimizer = torch.optim.Adam([{"params": list(means.values())},
                                           {"params": list(raw_scales.values()), "lr": scale_lr or lr}], lr=lr)
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


NLL = Callable[[object, object], torch.Tensor]  # (model output, batch) -> per-datum NLL (B,)


def init_vi(means: Dict[str, torch.Tensor], init_scale: Union[float, Dict[str, torch.Tensor]], lr: float,
            seed: int, scale_lr: Optional[float] = None) -> VIState:
    """A VI state with q centred on ``means`` (copied) and σ = ``init_scale``: one number for every parameter,
    or a tensor by name (:func:`fisher_scales`); Adam at ``lr`` for the means, ``scale_lr`` (None: ``lr``) for
    the raw scales."""
    mu = {n: t.detach().clone().requires_grad_(True) for n, t in means.items()}
    sigma = {n: (init_scale[n].to(t) if isinstance(init_scale, dict) else torch.full_like(t, init_scale))
             for n, t in mu.items()}
    rho = {n: softplus_inverse(sigma[n]).requires_grad_(True) for n in mu}
    return VIState(mu, rho, lr, seed, scale_lr)


def fisher_scales(model: torch.nn.Module, means: Dict[str, torch.Tensor], batches: Iterable,
                  terms: Sequence[Tuple[float, NLL]], num_data: int, prior: GaussianPrior) -> Dict[str, torch.Tensor]:
    """The mean-field Laplace scales σ_i = (N·Σ_k w_k F_k,ii + 1/s_i²)^(-1/2) at ``means``, by name.

    The per-datum NLL is the power likelihood Σ_k w_k ℓ_k of ``terms`` (weight, unweighted per-datum NLL of
    one label); F_k,ii is the diagonal empirical Fisher of ℓ_k, the mean over ``batches`` (each holding one
    datum) of its squared gradient at ``means``. Each term's curvature is w_k H_k ≈ w_k F_k: the Fisher of the
    weighted sum would count every weight twice (w_k²). N·Σ_k w_k F_k + 1/s² approximates the diagonal of the
    posterior's precision, whose inverse square root is the mean-field Gaussian's optimal σ for a Gaussian
    posterior. Parameters the data barely constrain start at the prior scale, the others below it.
    """
    params = {n: t.detach().clone().requires_grad_(True) for n, t in means.items()}
    curvature = {n: torch.zeros_like(t) for n, t in params.items()}
    count = 0
    for batch in batches:
        out = torch.func.functional_call(model, params, (batch,), strict=False)
        for k, (weight, nll) in enumerate(terms):
            grads = torch.autograd.grad(nll(out, batch).sum(), list(params.values()), allow_unused=True,
                                        retain_graph=k < len(terms) - 1)
            for n, g in zip(params, grads):
                if g is not None:
                    curvature[n] += weight * g.detach() ** 2
        count += 1
    if count == 0:
        raise ValueError("fisher_scales needs at least one batch")
    return {n: (num_data * curvature[n] / count + prior.scale_of(n) ** -2).rsqrt() for n in params}


def kl_divergence(means: Dict[str, torch.Tensor], scales: Dict[str, torch.Tensor], prior: GaussianPrior) -> torch.Tensor:
    """KL(q ‖ prior) in nats: Σ_i log(s_i/σ_i) + (σ_i² + (μ_i − c_i)²) / (2 s_i²) − 1/2."""
    total = 0.0
    for n, mu in means.items():
        s, c, sigma = prior.scale_of(n), prior.center_of(n, mu), scales[n]
        total = total + (math.log(s) - torch.log(sigma) + (sigma**2 + (mu - c) ** 2) / (2 * s**2) - 0.5).sum()
    return torch.as_tensor(total)


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


def fit(context: FitContext[VISettings]) -> Posterior:
    """Method ``vi``: fit the mean-field Gaussian of the stochastic parameters and write ``posterior.h5``.

    Files in ``context.out_dir``: ``map/`` (the MAP phase, with ``init`` or ``prior.center`` ``map``), ``vi/vi.ckpt``
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
    model = build_model(config)  # a fresh initialisation (seed config.seed) unless init is set
    if settings.uses_map():
        if settings.training is None:
            raise ValueError("vi.init or vi.prior.center is map: the MAP phase needs the training settings")
        fit_map_once(build_model(config), train, context.val, settings.training, out_dir / "map", seed=config.seed,
                     resume=context.resume)
        start = str(out_dir / "map" / "final.pt")
        init, center = (start if value == FROM_MAP else value for value in (settings.init, settings.prior.center))
        settings = replace(settings, init=init, prior=replace(settings.prior, center=center))
    if settings.init:
        shapes = {n: t.shape for n, t in model.state_dict().items()}
        start = pretrained_weights(settings.init, list(shapes), shapes)
        missing = sorted(set(shapes) - set(start))
        if missing:
            raise ValueError(f"vi.init {settings.init} has no value for {missing}")
        model.load_state_dict(start)
    stochastic = select_stochastic(model, settings.stochastic)
    prior = prior_from_spec(settings.prior, model, stochastic)
    device = resolve_device(settings.accelerator)
    model.to(device).train().requires_grad_(False)  # train mode: forces keep their graph for parameter gradients
    params = dict(model.named_parameters())
    means = {n: params[n] for n in stochastic}
    checkpoint = work / "vi.ckpt"
    resumed = context.resume and checkpoint.is_file()
    init_scale = settings.init_scale
    if init_scale == FISHER and not resumed:
        init_scale = _fisher_init(model, means, train, settings, prior, config.seed, device)
    # a resumed state takes its scales from the checkpoint
    state = init_vi(means, 1.0 if resumed else init_scale, settings.lr, seed=config.seed, scale_lr=settings.scale_lr)
    if resumed:
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


def artifacts(out_dir: Path) -> Artifacts:
    """The posterior file and the validation curve of the MAP phase (``map``)."""
    return Artifacts(Path(out_dir) / "posterior.h5", training_curves(out_dir, "map"))


def map_start(config: Mapping[str, Any], map_config: Mapping[str, Any]) -> Optional[MapStart]:
    """``vi.init`` and ``vi.prior.center`` ``map`` take the MAP run's posterior file when the runs share the
    sections a MAP fit reads (:func:`~mlip_uq.inference.trains_map_alike`)."""
    options = map_options(config, "vi")
    return MapStart(options=options) if options and trains_map_alike(config, map_config) else None


# The median σ is a smooth trace (a row differs from the last by Adam's small moves), so its rows are not the
# independent draws trace_drift's standard error assumes and any drift is "significant"; it counts as settled
# when it moves by less than 1 % between the last two fifths: every predictive spread then moves by about as
# little, well below the recalibration factors (0.8-1.3) and the differences between methods.
SCALE_DRIFT_TOLERANCE = 0.01


def report_convergence(work: Path) -> Dict:
    """Whether the fit converged: the drift of the negative ELBO (within its minibatch noise, or 1e-3 of its
    value) and of the median scale (within :data:`SCALE_DRIFT_TOLERANCE` of its value) between the last two
    fifths of ``work/trace.csv`` (:func:`~mlip_uq.inference.diagnostics.trace_drift`), written to
    ``work/convergence.json`` and logged, with a warning when either still moves."""
    rows = list(csv.DictReader((work / "trace.csv").open()))
    report: Dict = {"rows": len(rows)}
    if len(rows) >= 10:
        report["neg_elbo"] = trace_drift([float(r["neg_elbo"]) for r in rows])
        report["median_scale"] = trace_drift([float(r["median_scale"]) for r in rows], tolerance=0.0,
                                             relative_tolerance=SCALE_DRIFT_TOLERANCE)
        report["flat"] = report["neg_elbo"]["flat"] and report["median_scale"]["flat"]
        elbo, scale = report["neg_elbo"], report["median_scale"]
        (log.info if report["flat"] else log.warning)(
            "VI %s: between the last two fifths of the trace neg_elbo %.5g -> %.5g (%+.1f s.e.), median_scale "
            "%.5g -> %.5g (%+.2f %%)", "converged" if report["flat"] else
            "has not converged (more vi.steps, or another lr / scale_lr)", elbo["previous_mean"], elbo["last_mean"],
            elbo["change"] / max(elbo["standard_error"], 1e-300), scale["previous_mean"], scale["last_mean"],
            100 * scale["relative_change"])
    write_json(report, work / "convergence.json")
    return report


def _fisher_init(model, means, train, settings: VISettings, prior: GaussianPrior, seed: int,
                 device: torch.device) -> Dict[str, torch.Tensor]:
    """:func:`fisher_scales` from ``settings.fisher_structures`` training structures: the first one-structure
    minibatches of the seeded epoch order, each structure once."""
    count = min(settings.fisher_structures, len(train))
    batches = (AtomicDataDict.to_(minibatch(train, 1, seed, step), device) for step in range(count))
    weights = settings.likelihood_weights
    labels = ["energy", "forces"] + (["stress"] if AtomicDataDict.STRESS_KEY in train[0] else [])

    def term(label):
        alone = LossWeights(**{k: float(k == label) for k in ("energy", "forces", "stress")})
        return getattr(weights, label), lambda out, batch: neg_log_likelihood(out, batch, alone)

    start = time.perf_counter()
    scales = fisher_scales(model, means, batches, [term(k) for k in labels if getattr(weights, k)], len(train),
                           prior)
    median = float(torch.cat([s.flatten() for s in scales.values()]).median())
    log.info("VI scales from the empirical Fisher of %d structures (%.0f s): median %.4g", count,
             time.perf_counter() - start, median)
    return scales


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
