"""SG-MCMC chains and their files: a chain's model, optimiser and checkpoint (:class:`Chain`), what a process
needs to run chains (:class:`Job`), the stepping loop of one chain (:func:`run_chain`), each chain's sample file
``samples_chain<c>.h5`` and the posterior assembled from them (:func:`assemble_posterior`; the run's
``posterior.h5`` is written by the method once it is final).

A chain's checkpoint is written with every sample and every ``checkpoint_every`` steps; samples written after
the last checkpoint are dropped on resume and drawn again, so that a killed run resumes without losing or
repeating samples. All writes are atomic (:func:`mlip_uq.files.atomic_write`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
from nequip.data import AtomicDataDict

from ..files import appending_csv, load_checkpoint
from ..model import ModelConfig, build_model
from ..posterior import Posterior, load_posterior
from .common import minibatch, save_checkpoint
from .loss import neg_log_likelihood
from .priors import GaussianPrior, layer_of
from .schedule import Schedule
from .sghmc import AdaptiveSGHMC

if TYPE_CHECKING:
    from .sgmcmc import SGMCMCSettings

log = logging.getLogger(__name__)


class NoDrawsError(RuntimeError):
    """An SG-MCMC run (or continuation) ended with no draw: every chain diverged (NaN/inf) before its first."""


class Chain:
    """One chain's model, optimiser, schedule and files."""

    def __init__(self, chain: int, config: ModelConfig, settings: "SGMCMCSettings", stochastic: List[str],
                 prior: GaussianPrior, num_data: int, work: Path, start: Dict[str, torch.Tensor],
                 device: torch.device):
        self.chain, self.settings, self.stochastic, self.prior = chain, settings, stochastic, prior
        self.seed = config.seed + 7919 * chain
        self.model = build_model(ModelConfig.from_dict({**config.to_dict(), "seed": self.seed})).to(device).train()
        self.device = device
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
        self.checkpoint_path = work / f"chain{chain}.ckpt"
        self.trace_path = work / f"trace_chain{chain}.csv"
        self.samples_path = work / f"samples_chain{chain}.h5"
        self.step = 0
        self.n_drawn = 0
        self.status = "running"
        self.round = 0
        self.round_start = 0

    def fix_shared(self) -> None:
        """After burn-in: freeze the preconditioner and fix the non-stochastic parameters."""
        self.optimizer.freeze_preconditioner()
        for name, p in self.params.items():
            p.requires_grad_(name in self.stochastic)

    def start_round(self, round_: int, num_data: int, readapt: bool = False) -> None:
        """Begin warm-start round ``round_`` from the current state on a training set of ``num_data``; with
        ``readapt`` the preconditioner adapts again until the round's burn-in ends."""
        self.round, self.round_start, self.n_drawn, self.status = round_, self.step, 0, "running"
        for group in self.optimizer.param_groups:
            group["num_data"] = num_data
        if readapt:
            self.optimizer.thaw_preconditioner()

    def schedule(self, rounds: Dict) -> Schedule:
        if self.round == 0:
            return self.settings.schedule()
        return self.settings.schedule(start=self.round_start, settle_steps=rounds["settle_steps"],
                                      n_samples=rounds["n_samples"], readapt_steps=rounds.get("readapt_steps", 0))

    def state(self) -> Dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "n_drawn": self.n_drawn, "status": self.status, "round": self.round, "round_start": self.round_start}

    def save(self, path: Optional[Path] = None) -> None:
        """Checkpoint the chain (atomically) to ``path`` (default: its checkpoint file)."""
        save_checkpoint(self.state(), path or self.checkpoint_path)

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.n_drawn, self.status = state["step"], state["n_drawn"], state["status"]
        self.round, self.round_start = state.get("round", 0), state.get("round_start", 0)
        readapting = self.round > 0 and not self.optimizer.preconditioner_frozen  # killed in a round's burn-in
        if self.step >= self.settings.burnin_steps:
            self.fix_shared()
        if readapting:
            self.optimizer.thaw_preconditioner()


@dataclass
class Job:
    """Everything a process needs to run its chains (picklable, for spawned processes)."""

    config: ModelConfig
    train: List[AtomicDataDict.Type]
    settings: "SGMCMCSettings"
    stochastic: List[str]
    prior: GaussianPrior
    start: Dict[str, torch.Tensor]
    out_dir: Path
    hyper: Dict
    metadata: Dict
    resume: bool
    rounds: Dict  # the warm-start round: {"round": r, "settle_steps", "n_samples", ...}; round 0 = the first run

    @property
    def work(self) -> Path:
        return self.out_dir / "sgmcmc"

    @property
    def partial(self) -> bool:
        return bool(self.hyper["partial"])

    def chain(self, c: int, device: torch.device) -> Chain:
        return Chain(c, self.config, self.settings, self.stochastic, self.prior, len(self.train), self.work,
                      self.start, device)


def chain_samples(path: Path, round_: int) -> Optional[Posterior]:
    """A chain's sample file, if it holds samples of round ``round_``."""
    if not path.is_file():
        return None
    samples = load_posterior(path)
    return samples if samples.hyperparameters.get("round", 0) == round_ else None


def write_chain_samples(chain: Chain, job: Job) -> None:
    """Write ``chain.samples`` (its samples of this round) to the chain's sample file, atomically."""
    if not chain.samples:
        chain.samples_path.unlink(missing_ok=True)
        return
    shared = {n: t.detach().cpu().clone() for n, t in chain.model.state_dict().items() if n not in job.stochastic}
    stacked = {n: torch.stack([s[n] for s in chain.samples]) for n in job.stochastic}
    Posterior(job.config, shared, stacked, method="sgmcmc", hyperparameters={"round": chain.round, "chain": chain.chain},
              **job.metadata).save(chain.samples_path)


def assemble_posterior(job: Job) -> Optional[Posterior]:
    """The posterior of all chains' samples of the current round (chain order); None while no chain has a
    sample. Not written here: a run's ``posterior.h5`` is written once its posterior is final (the method's
    ``fit`` or ``update``), so a killed run leaves none that differs from the finished run's."""
    parts = [(c, chain_samples(job.work / f"samples_chain{c}.h5", job.rounds["round"]))
             for c in range(job.settings.n_chains)]
    parts = [(c, p) for c, p in parts if p is not None]
    if not parts:
        return None
    chains = [c for c, p in parts for _ in range(p.n_samples)]
    samples = {n: torch.cat([p.samples[n] for _, p in parts]) for n in job.stochastic}
    return Posterior(job.config, parts[0][1].shared, samples, method="sgmcmc",
                     hyperparameters={**job.hyper, "sample_chains": chains, "round": job.rounds["round"]},
                     **job.metadata)


TRACE_FIELDS = ["step", "phase", "temperature", "neg_log_likelihood", "neg_log_prior", "grad_norm",
                 "median_step_size"]


def run_chain(chain: Chain, job: Job, stop: int) -> None:
    """Step ``chain`` until step ``stop``, drawing the samples its schedule asks for."""
    settings, schedule = job.settings, chain.schedule(job.rounds)
    start = time.perf_counter()
    n = len(job.train)
    with appending_csv(chain.trace_path, TRACE_FIELDS, "step", chain.step) as writer:
        while chain.step < stop:
            step = chain.step
            temperature, lr = schedule.temperature_at(step), settings.lr * schedule.lr_factor(step)
            for group in chain.optimizer.param_groups:
                group["temperature"], group["lr"] = temperature, lr
            batch = AtomicDataDict.to_(minibatch(job.train, settings.batch_size, chain.seed, step), chain.device)
            nll = neg_log_likelihood(chain.model(batch), batch, settings.likelihood_weights).mean()
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
            if chain.step == schedule.burnin_end > schedule.start:
                chain.fix_shared()
            if step % settings.trace_every == 0:
                writer.writerow(trace_row(chain, schedule, step, n * nll.item()))
            if schedule.sample_index(step) is not None:
                # a step can blow the parameters up while the loss it started from was finite: a sample must
                # predict finite values on the minibatch before it is kept
                check = neg_log_likelihood(chain.model(batch), batch, settings.likelihood_weights).mean()
                if not torch.isfinite(check):
                    chain.status = "diverged"
                    log.error("chain %d diverged at step %d (its sample predicts %s); it stops here, keeping its "
                              "%d samples", chain.chain, step, check.item(), chain.n_drawn)
                    break
                chain.n_drawn += 1
                chain.samples.append({name: chain.params[name].detach().cpu().clone() for name in job.stochastic})
                write_chain_samples(chain, job)
                chain.save()
                log.info("chain %d: sample %d/%d at step %d (%.0f s)", chain.chain, chain.n_drawn,
                         schedule.n_samples, chain.step, time.perf_counter() - start)
            elif chain.step % settings.checkpoint_every == 0:
                chain.save()
                log.info("chain %d: step %d/%d, %s, T %.3g, N*nll %.5g (%.0f s)", chain.chain, chain.step,
                         schedule.end, schedule.phase(step), temperature, n * nll.item(), time.perf_counter() - start)
        if chain.step >= schedule.end:
            chain.status = "done"
        chain.save()


def trace_row(chain: Chain, schedule: Schedule, step: int, neg_log_lik: float) -> Dict:
    stochastic = {n: chain.params[n] for n in chain.stochastic}
    grads = [p.grad for p in chain.params.values() if p.grad is not None]
    lr = chain.optimizer.param_groups[0]["lr"]
    step_sizes = torch.cat([(lr * chain.optimizer.preconditioner(p)).flatten() for p in stochastic.values()])
    return {
        "step": step,
        "phase": schedule.phase(step),
        "temperature": schedule.temperature_at(step),
        "neg_log_likelihood": neg_log_lik,
        "neg_log_prior": chain.prior.neg_log_prob({n: p.detach() for n, p in stochastic.items()}).item(),
        "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))) if grads else 0.0,
        "median_step_size": float(step_sizes.median()),
    }
