"""The SG-MCMC driver: burn-in, pre-heat, thinned sampling, several chains, checkpoints and diagnostics.

The update itself is :class:`~mlip_uq.inference.sgmcmc.AdaptiveSGHMC`; this module owns everything around it
(kernel and driver kept apart, as in BlackJAX):

1. **burn-in** — noise-free (temperature 0): a preconditioned momentum optimiser over all trainable
   parameters while the preconditioner adapts. Then the preconditioner is frozen, and in a partially
   Bayesian model the non-stochastic parameters are fixed at their burn-in values.
2. **pre-heat** — the temperature ramps linearly from 0 to its target.
3. **sampling** — one sample every ``thinning`` steps.

Each chain has its own seed (and, in a fully Bayesian model, its own initialisation and burn-in; a partially
Bayesian model shares one burn-in so that the fixed parameters are the same in every sample). Every sample is
added to ``posterior.h5`` at once (atomic rewrite) and the chain is checkpointed with it, so a killed run
resumes from its last checkpoint without losing or repeating samples. A NaN/inf stops the chain with a message
and keeps the samples drawn before it.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from nequip.data import AtomicDataDict

from ..config import settings_from
from ..data import collate
from ..model import ModelConfig, build_model
from ..posterior import Posterior, load_posterior
from .diagnostics import effective_sample_size, split_rhat
from .loss import NoiseModel, neg_log_likelihood
from .priors import GaussianPrior, layer_of, pretrained_weights, select_stochastic
from .sgmcmc import AdaptiveSGHMC

log = logging.getLogger(__name__)


@dataclass
class SGMCMCSettings:
    """Settings of the adaptive SGHMC run (steps are minibatch steps).

    Args:
        lr: step size η of the velocity update (see AdaptiveSGHMC).
        friction: friction α per step.
        temperature: target temperature (1 = the Bayesian posterior; < 1 a cold posterior).
        batch_size: frames per minibatch.
        burnin_steps: noise-free steps while the preconditioner adapts.
        preheat_steps: steps over which the temperature ramps from 0 to ``temperature``.
        n_samples: samples per chain.
        thinning: steps between samples.
        n_chains: number of chains (run one after the other).
        stochastic: which parameters are sampled: ``all``, ``{last_layers: N}`` or ``{patterns: [...]}``.
        init: start every chain from pre-trained weights (a posterior file or checkpoint, matched as prior
            centres are) instead of a fresh initialisation; None: fresh.
        prior: ``{scale: s, layer_scales: {layer: s}, center: null | path}`` — Gaussian prior; ``center`` a
            posterior file or checkpoint of a pre-trained model (transfer-learning prior).
        noise: observation noise ``{energy: eV/atom, forces: eV/Å, stress: eV/Å³, heteroscedastic: bool}``.
        checkpoint_every: steps between checkpoints (besides the one taken with every sample).
        trace_every: steps between trace rows.
        beta2: EMA factor of the squared-gradient preconditioner.
        eps: preconditioner regulariser.
    """

    lr: float = 1e-4
    friction: float = 0.05
    temperature: float = 1.0
    batch_size: int = 8
    burnin_steps: int = 2000
    preheat_steps: int = 500
    n_samples: int = 20
    thinning: int = 100
    n_chains: int = 1
    stochastic: Union[str, Dict] = "all"
    init: Optional[str] = None
    prior: Dict = field(default_factory=lambda: {"scale": 1.0})
    noise: Dict = field(default_factory=dict)
    checkpoint_every: int = 500
    trace_every: int = 10
    beta2: float = 0.999
    eps: float = 1e-8

    @property
    def total_steps(self) -> int:
        return self.burnin_steps + self.preheat_steps + self.n_samples * self.thinning

    def temperature_at(self, step: int) -> float:
        if step < self.burnin_steps:
            return 0.0
        if step < self.burnin_steps + self.preheat_steps:
            return self.temperature * (step - self.burnin_steps + 1) / self.preheat_steps
        return self.temperature

    def is_sample_step(self, step: int) -> bool:
        k = step + 1 - self.burnin_steps - self.preheat_steps
        return k > 0 and k % self.thinning == 0


def minibatch(graphs: List[AtomicDataDict.Type], batch_size: int, seed: int, step: int) -> AtomicDataDict.Type:
    """The minibatch of ``step``: epochs of a seeded permutation, a pure function of (seed, step) so that a
    resumed chain sees exactly the batches it would have seen."""
    per_epoch = max(1, len(graphs) // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return collate([graphs[i] for i in order[position * batch_size : (position + 1) * batch_size]])


class _Chain:
    """One chain's model, optimiser and files."""

    def __init__(self, chain: int, config: ModelConfig, settings: SGMCMCSettings, stochastic: List[str],
                 prior: GaussianPrior, num_data: int, out: Path, start: Dict[str, torch.Tensor]):
        self.chain, self.settings, self.stochastic, self.prior = chain, settings, stochastic, prior
        self.seed = config.seed + 7919 * chain
        self.model = build_model(ModelConfig.from_dict({**config.to_dict(), "seed": self.seed})).train()
        self.params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in start.items():  # pre-trained starting point (settings.init), if any
                self.params[name].copy_(value)
        groups = {}
        for name, p in self.params.items():
            key = (prior.scale_of(name), layer_of(name))
            groups.setdefault(key, []).append(name)
        self.optimizer = AdaptiveSGHMC(
            [
                {"params": [self.params[n] for n in names], "param_names": names, "prior_scale": scale,
                 "prior_center": [prior.center_of(n, self.params[n]) for n in names]}
                for (scale, _), names in groups.items()
            ],
            lr=settings.lr, num_data=num_data, temperature=0.0, friction=settings.friction,
            beta2=settings.beta2, eps=settings.eps, seed=self.seed,
        )
        self.checkpoint_path = out / f"chain{chain}.ckpt"
        self.trace_path = out / f"trace_chain{chain}.csv"
        self.step = 0
        self.n_drawn = 0
        self.status = "running"

    def fix_shared(self) -> None:
        """After burn-in: freeze the preconditioner and fix the non-stochastic parameters."""
        self.optimizer.freeze_preconditioner()
        for name, p in self.params.items():
            p.requires_grad_(name in self.stochastic)

    def state(self) -> Dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "n_drawn": self.n_drawn, "status": self.status}

    def save(self, path: Optional[Path] = None) -> None:
        path = path or self.checkpoint_path
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.n_drawn, self.status = state["step"], state["n_drawn"], state["status"]
        if self.step >= self.settings.burnin_steps:
            self.fix_shared()


class _SampleSet:
    """The samples drawn so far (all chains) and the posterior file that holds them."""

    def __init__(self, config: ModelConfig, stochastic: List[str], path: Path, hyper: Dict, metadata: Dict):
        self.config, self.stochastic, self.path, self.hyper, self.metadata = config, stochastic, path, hyper, metadata
        self.samples: List[Dict[str, torch.Tensor]] = []
        self.chains: List[int] = []
        self.shared: Optional[Dict[str, torch.Tensor]] = None

    def load(self) -> None:
        """Samples of a killed run, from its posterior file."""
        if self.path.is_file():
            previous = load_posterior(self.path)
            self.chains = list(previous.hyperparameters["sample_chains"])
            self.samples = [previous.sample_parameters(k) for k in range(previous.n_samples)]
            self.shared = dict(previous.shared)

    def keep(self, chain: int, n: int) -> None:
        """Keep only the first ``n`` samples of ``chain`` (those its checkpoint knows about)."""
        idx = [i for i, c in enumerate(self.chains) if c == chain]
        drop = set(idx[n:])
        self.samples = [s for i, s in enumerate(self.samples) if i not in drop]
        self.chains = [c for i, c in enumerate(self.chains) if i not in drop]

    def add(self, chain: "_Chain") -> None:
        if self.shared is None:
            self.shared = {n: t.detach().clone() for n, t in chain.model.state_dict().items() if n not in self.stochastic}
        self.samples.append({n: chain.params[n].detach().clone() for n in self.stochastic})
        self.chains.append(chain.chain)
        self.posterior().save(self.path)

    def posterior(self) -> Posterior:
        return Posterior(
            self.config, self.shared, {n: torch.stack([s[n] for s in self.samples]) for n in self.stochastic},
            method="sgmcmc", hyperparameters={**self.hyper, "sample_chains": self.chains}, **self.metadata,
        )


def run_sgmcmc(
    config: ModelConfig,
    train: List[AtomicDataDict.Type],
    settings: SGMCMCSettings,
    out_dir: Path,
    resume: bool = False,
    metadata: Optional[Dict] = None,
) -> Posterior:
    """Sample the posterior of ``config``'s parameters given the ``train`` graphs; returns the Posterior and
    keeps ``out_dir/posterior.h5`` up to date with every sample drawn.

    Files: ``out_dir/sgmcmc/chain<c>.ckpt`` (checkpoints), ``trace_chain<c>.csv`` (potential terms, step
    sizes, gradient norms), ``diagnostics.json`` (ESS per layer, split-R̂ across chains), ``trace.png``.
    """
    out_dir = Path(out_dir)
    work = out_dir / "sgmcmc"
    work.mkdir(parents=True, exist_ok=True)
    noise = settings_from(NoiseModel, settings.noise, "sgmcmc.noise")
    if noise.heteroscedastic and not config.noise_head:
        raise ValueError("sgmcmc.noise.heteroscedastic needs model.noise_head: true")
    template = build_model(config)
    stochastic = select_stochastic(template, settings.stochastic)
    partial = len(stochastic) < sum(1 for p in template.parameters() if p.requires_grad)
    prior = _prior(settings.prior, template, stochastic)
    store = _SampleSet(config, stochastic, out_dir / "posterior.h5", {**asdict(settings), "partial": partial},
                       dict(metadata or {}))
    if resume:
        store.load()
    shapes = {n: p.shape for n, p in template.named_parameters()}
    start = pretrained_weights(settings.init, list(shapes), shapes) if settings.init else {}  # read once
    shared_burnin = work / "burnin.ckpt"
    for c in range(settings.n_chains):
        chain = _Chain(c, config, settings, stochastic, prior, len(train), work, start)
        if resume and chain.checkpoint_path.is_file():
            chain.load(chain.checkpoint_path)
        elif partial and shared_burnin.is_file():
            # one burn-in for all chains: the fixed parameters are the same in every sample
            chain.load(shared_burnin)
            chain.optimizer.reseed(chain.seed)
        # samples written after the chain's last checkpoint are dropped: the chain draws them again
        store.keep(c, chain.n_drawn)
        if chain.status == "running":
            _run_chain(chain, train, settings, noise, store, shared_burnin if partial else None)
    if not store.samples:
        raise RuntimeError(f"no SG-MCMC sample was drawn; see the traces in {work}")
    posterior = store.posterior()
    posterior.save(store.path)
    write_diagnostics(posterior, work)
    return posterior


def _prior(spec: Dict, model: torch.nn.Module, stochastic: List[str]) -> GaussianPrior:
    spec = dict(spec)
    center = spec.pop("center", None)
    unknown = set(spec) - {"scale", "layer_scales"}
    if unknown:
        raise ValueError(f"unknown sgmcmc.prior option(s) {sorted(unknown)}; use scale, layer_scales, center")
    centers = {}
    if center:
        shapes = {n: p.shape for n, p in model.named_parameters()}
        centers = pretrained_weights(center, stochastic, shapes)
        log.info("prior centred on %s for %d of %d stochastic tensors (the rest zero-centred)",
                 center, len(centers), len(stochastic))
    return GaussianPrior(scale=float(spec.get("scale", 1.0)), layer_scales=spec.get("layer_scales", {}), centers=centers)


_TRACE_FIELDS = ["step", "phase", "temperature", "neg_log_likelihood", "neg_log_prior", "grad_norm",
                 "median_step_size"]


def _run_chain(chain: _Chain, train, settings: SGMCMCSettings, noise: NoiseModel, store: _SampleSet,
               shared_burnin: Optional[Path]) -> None:
    # rows after the checkpoint being resumed from are written again
    kept = [r for r in csv.DictReader(open(chain.trace_path))] if chain.trace_path.is_file() else []
    trace_file = open(chain.trace_path, "w", newline="")
    writer = csv.DictWriter(trace_file, fieldnames=_TRACE_FIELDS)
    writer.writeheader()
    writer.writerows(r for r in kept if int(r["step"]) < chain.step)
    start = time.perf_counter()
    n = len(train)
    try:
        while chain.step < settings.total_steps:
            step = chain.step
            temperature = settings.temperature_at(step)
            for group in chain.optimizer.param_groups:
                group["temperature"] = temperature
            batch = minibatch(train, settings.batch_size, chain.seed, step)
            nll = neg_log_likelihood(chain.model(batch), batch, noise).mean()
            chain.optimizer.zero_grad(set_to_none=True)
            try:
                if not torch.isfinite(nll):
                    raise FloatingPointError(f"the negative log-likelihood is {nll.item()}")
                nll.backward()
                chain.optimizer.step()
            except FloatingPointError as e:
                chain.status = "diverged"
                log.error("chain %d diverged at step %d (%s); it stops here, keeping its %d samples",
                          chain.chain, step, e, chain.n_drawn)
                break
            chain.step = step + 1
            if chain.step == settings.burnin_steps:
                chain.fix_shared()
                if shared_burnin is not None and not shared_burnin.is_file():
                    chain.save(shared_burnin)
            if step % settings.trace_every == 0:
                writer.writerow(_trace_row(chain, step, temperature, n * nll.item(), settings))
            if settings.is_sample_step(step):
                chain.n_drawn += 1
                store.add(chain)
                chain.save()
                log.info("chain %d: sample %d/%d at step %d (%.0f s)", chain.chain, chain.n_drawn,
                         settings.n_samples, chain.step, time.perf_counter() - start)
            elif chain.step % settings.checkpoint_every == 0:
                chain.save()
                log.info("chain %d: step %d/%d, %s, T %.3g, N*nll %.5g (%.0f s)", chain.chain, chain.step,
                         settings.total_steps, _phase(settings, step), temperature, n * nll.item(),
                         time.perf_counter() - start)
        else:
            chain.status = "done"
        chain.save()
    finally:
        trace_file.close()


def _phase(settings: SGMCMCSettings, step: int) -> str:
    if step < settings.burnin_steps:
        return "burnin"
    return "preheat" if step < settings.burnin_steps + settings.preheat_steps else "sampling"


def _trace_row(chain: _Chain, step: int, temperature: float, neg_log_lik: float, settings: SGMCMCSettings) -> Dict:
    stochastic = {n: chain.params[n] for n in chain.stochastic}
    grads = [p.grad for p in chain.params.values() if p.grad is not None]
    step_sizes = torch.cat([(settings.lr * chain.optimizer.preconditioner(p)).flatten() for p in stochastic.values()])
    return {
        "step": step,
        "phase": _phase(settings, step),
        "temperature": temperature,
        "neg_log_likelihood": neg_log_lik,
        "neg_log_prior": chain.prior.neg_log_prob({n: p.detach() for n, p in stochastic.items()}).item(),
        "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) if grads else 0.0,
        "median_step_size": float(step_sizes.median()),
    }


def write_diagnostics(posterior: Posterior, work: Path) -> Dict:
    """ESS per layer (median and minimum over the layer's parameters, summed over chains) and split-R̂ across
    chains (median and maximum), written to ``diagnostics.json``; and a trace plot ``trace.png``."""
    chains = np.asarray(posterior.hyperparameters["sample_chains"])
    ids = sorted(set(chains.tolist()))
    n_draws = min(int((chains == c).sum()) for c in ids)
    out: Dict = {"n_chains": len(ids), "draws_per_chain": n_draws, "layers": {}}
    if n_draws >= 4:
        by_layer: Dict[str, List[np.ndarray]] = {}
        for name, t in posterior.samples.items():
            x = np.stack([t[chains == c][:n_draws].reshape(n_draws, -1).double().numpy() for c in ids])
            by_layer.setdefault(layer_of(name), []).append(x)
        for layer, xs in by_layer.items():
            x = np.concatenate(xs, axis=-1)
            x = x[..., x.std(axis=(0, 1)) > 0]  # constant coordinates have no ESS
            if x.shape[-1] == 0:
                continue
            ess = effective_sample_size(x)
            entry = {"ess_median": float(np.median(ess)), "ess_min": float(np.min(ess)), "n_params": int(x.shape[-1])}
            if len(ids) > 1:
                rhat = split_rhat(x)
                entry.update(rhat_median=float(np.nanmedian(rhat)), rhat_max=float(np.nanmax(rhat)))
            out["layers"][layer] = entry
    (work / "diagnostics.json").write_text(json.dumps(out, indent=2) + "\n")
    _plot_traces(work)
    return out


def _plot_traces(work: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6))
    ax_lik, ax_step = fig.subplots(2, 1, sharex=True)
    for path in sorted(work.glob("trace_chain*.csv")):
        rows = list(csv.DictReader(open(path)))
        if not rows:
            continue
        steps = [int(r["step"]) for r in rows]
        ax_lik.plot(steps, [float(r["neg_log_likelihood"]) for r in rows], lw=0.8, label=path.stem.removeprefix("trace_"))
        ax_step.plot(steps, [float(r["median_step_size"]) for r in rows], lw=0.8)
    ax_lik.set_yscale("symlog")
    ax_lik.set_ylabel("N · mean NLL")
    ax_lik.legend(fontsize=8)
    ax_step.set_yscale("log")
    ax_step.set_ylabel("median η·P (stochastic)")
    ax_step.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(work / "trace.png", dpi=120)
