"""The SG-MCMC driver: burn-in, pre-heat, thinned or cyclical sampling, chains in sequence or in parallel
processes, warm-start continuation, checkpoints and diagnostics.

The update itself is :class:`~mlip_uq.inference.sgmcmc.AdaptiveSGHMC`; this module owns everything around it
(kernel and driver kept apart, as in BlackJAX):

1. **burn-in** — noise-free (temperature 0): a preconditioned momentum optimiser over all trainable
   parameters while the preconditioner adapts. Then the preconditioner is frozen, and in a partially
   Bayesian model the non-stochastic parameters are fixed at their burn-in values.
2. **pre-heat** — the temperature ramps linearly from 0 to its target.
3. **sampling** — one sample every ``thinning`` steps; or, with ``cycle_steps``, cyclical step sizes
   (cosine cycles with restarts, after Zhang et al., ICLR 2020): each cycle starts with a noise-free
   exploration part at large steps and ends with a sampling part at small steps.

Each chain has its own seed (and, in a fully Bayesian model, its own initialisation and burn-in; a partially
Bayesian model shares one burn-in so that the fixed parameters are the same in every sample). Chains run one
after the other, or in ``n_processes`` processes (devices) launched by Lightning Fabric (``ddp_spawn``), chain
``c`` on process ``c % n_processes``; a chain's samples do not depend on where it ran.

Each chain's samples go to ``sgmcmc/samples_chain<c>.h5`` as they are drawn, the chain is checkpointed with
each, and ``posterior.h5`` is re-assembled from the chain files (all writes atomic), so a killed run resumes
from its last checkpoints without losing or repeating samples. A NaN/inf stops the chain with a message and
keeps the samples drawn before it.

:func:`continue_sgmcmc` warm-starts every chain of a finished run on a new (e.g. grown) training set: a
re-equilibration at the target temperature with the frozen preconditioner, then new samples that replace the
old ones ("rounds"); it is idempotent, so a killed continuation is resumed by calling it again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
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
from .priors import GaussianPrior, layer_of, pretrained_weights, prior_from_spec, select_stochastic
from .sgmcmc import AdaptiveSGHMC

log = logging.getLogger(__name__)


@dataclass
class SGMCMCSettings:
    """Settings of the adaptive SGHMC run (steps are minibatch steps).

    Args:
        lr: step size η of the velocity update (see AdaptiveSGHMC); the maximum of a cycle with ``cycle_steps``.
        friction: friction α per step.
        temperature: target temperature (1 = the Bayesian posterior; < 1 a cold posterior).
        batch_size: frames per minibatch.
        burnin_steps: noise-free steps while the preconditioner adapts.
        preheat_steps: steps over which the temperature ramps from 0 to ``temperature``.
        n_samples: samples per chain.
        thinning: steps between samples (within the sampling part of a cycle, with ``cycle_steps``).
        n_chains: number of chains.
        cycle_steps: None = constant step size; else the sampling phase is made of cosine cycles of this many
            steps, η_t = lr · (1 + cos(π t / cycle_steps)) / 2 restarting at lr every cycle.
        exploration_fraction: with ``cycle_steps``, the first part of each cycle runs noise-free (exploration);
            samples are drawn in the rest.
        n_processes: chains run in this many processes (Lightning Fabric, ``ddp_spawn``; one device each with
            a GPU accelerator); 1 = one after the other in this process.
        accelerator: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
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
    cycle_steps: Optional[int] = None
    exploration_fraction: float = 0.5
    n_processes: int = 1
    accelerator: str = "auto"
    stochastic: Union[str, Dict] = "all"
    init: Optional[str] = None
    prior: Dict = field(default_factory=lambda: {"scale": 1.0})
    noise: Dict = field(default_factory=dict)
    checkpoint_every: int = 500
    trace_every: int = 10
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        for name in ("batch_size", "n_samples", "thinning", "n_chains", "n_processes", "checkpoint_every",
                     "trace_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"sgmcmc.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.burnin_steps < 1 or self.preheat_steps < 0:
            raise ValueError("sgmcmc.burnin_steps must be >= 1 and sgmcmc.preheat_steps >= 0")
        if self.accelerator not in ("auto", "cpu", "cuda"):
            raise ValueError(f"sgmcmc.accelerator must be auto, cpu or cuda, got {self.accelerator!r}")
        if self.cycle_steps is not None:
            if not 0 <= self.exploration_fraction < 1:
                raise ValueError(f"sgmcmc.exploration_fraction must be in [0, 1), got {self.exploration_fraction}")
            if self.schedule().per_cycle < 1:
                raise ValueError(
                    f"sgmcmc.cycle_steps={self.cycle_steps} leaves no room for a sample: the sampling part of a "
                    f"cycle ({self.cycle_steps - self.schedule().exploration_steps} steps) is shorter than "
                    f"thinning={self.thinning}"
                )

    def schedule(self, start: int = 0, settle_steps: int = 0, n_samples: Optional[int] = None) -> "Schedule":
        """The step plan of a chain: from step 0 with burn-in and pre-heat (a run), or, for a warm start, from
        ``start`` with ``settle_steps`` at the target temperature and ``n_samples`` samples (a continuation)."""
        first_run = start == 0
        burnin_end = self.burnin_steps if first_run else start
        preheat_end = burnin_end + (self.preheat_steps if first_run else 0)
        exploration = 0 if self.cycle_steps is None else int(math.ceil(self.exploration_fraction * self.cycle_steps))
        return Schedule(start=start, burnin_end=burnin_end, preheat_end=preheat_end,
                        sampling_start=preheat_end + settle_steps,
                        n_samples=self.n_samples if n_samples is None else n_samples, thinning=self.thinning,
                        temperature=self.temperature, cycle_steps=self.cycle_steps, exploration_steps=exploration)


@dataclass(frozen=True)
class Schedule:
    """Phase, temperature, step-size factor and sample index of every step of one chain segment.

    Steps ``[start, burnin_end)``: burn-in (T = 0, preconditioner adapting); ``[burnin_end, preheat_end)``:
    the temperature ramps to its target; ``[preheat_end, sampling_start)``: settling at the target
    temperature (warm starts); from ``sampling_start``: sampling, a sample after every ``thinning``-th step,
    or in cycles of ``cycle_steps`` whose first ``exploration_steps`` are noise-free.
    """

    start: int
    burnin_end: int
    preheat_end: int
    sampling_start: int
    n_samples: int
    thinning: int
    temperature: float
    cycle_steps: Optional[int] = None
    exploration_steps: int = 0

    @property
    def per_cycle(self) -> int:
        return (self.cycle_steps - self.exploration_steps) // self.thinning

    @property
    def end(self) -> int:
        """The step after the last sample."""
        if self.cycle_steps is None:
            return self.sampling_start + self.n_samples * self.thinning
        cycle, j = divmod(self.n_samples - 1, self.per_cycle)
        return self.sampling_start + cycle * self.cycle_steps + self.exploration_steps + (j + 1) * self.thinning

    def _position(self, step: int) -> int:
        return (step - self.sampling_start) % self.cycle_steps

    def phase(self, step: int) -> str:
        if step < self.burnin_end:
            return "burnin"
        if step < self.preheat_end:
            return "preheat"
        if step < self.sampling_start:
            return "settle"
        if self.cycle_steps is not None and self._position(step) < self.exploration_steps:
            return "exploration"
        return "sampling"

    def temperature_at(self, step: int) -> float:
        phase = self.phase(step)
        if phase in ("burnin", "exploration"):
            return 0.0
        if phase == "preheat":
            return self.temperature * (step - self.burnin_end + 1) / (self.preheat_end - self.burnin_end)
        return self.temperature

    def lr_factor(self, step: int) -> float:
        """1 outside cycles; (1 + cos(π t / cycle_steps)) / 2 at position t of a cycle."""
        if self.cycle_steps is None or step < self.sampling_start:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * self._position(step) / self.cycle_steps))

    def sample_index(self, step: int) -> Optional[int]:
        """The index of the sample taken after ``step`` (0-based), or None when no sample is taken there."""
        if step < self.sampling_start:
            return None
        k = step - self.sampling_start
        if self.cycle_steps is None:
            index = (k + 1) // self.thinning - 1 if (k + 1) % self.thinning == 0 else None
        else:
            cycle, position = divmod(k, self.cycle_steps)
            j = position - self.exploration_steps + 1
            if j <= 0 or j % self.thinning or j // self.thinning > self.per_cycle:
                return None
            index = cycle * self.per_cycle + j // self.thinning - 1
        return index if index is not None and index < self.n_samples else None


def minibatch(graphs: List[AtomicDataDict.Type], batch_size: int, seed: int, step: int) -> AtomicDataDict.Type:
    """The minibatch of ``step``: epochs of a seeded permutation, a pure function of (seed, step) so that a
    resumed chain sees exactly the batches it would have seen."""
    per_epoch = max(1, len(graphs) // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return collate([graphs[i] for i in order[position * batch_size : (position + 1) * batch_size]])


class _Chain:
    """One chain's model, optimiser, schedule and files."""

    def __init__(self, chain: int, config: ModelConfig, settings: SGMCMCSettings, stochastic: List[str],
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

    def start_round(self, round_: int, num_data: int) -> None:
        """Begin warm-start round ``round_`` from the current state on a training set of ``num_data``."""
        self.round, self.round_start, self.n_drawn, self.status = round_, self.step, 0, "running"
        for group in self.optimizer.param_groups:
            group["num_data"] = num_data

    def schedule(self, rounds: Dict) -> Schedule:
        if self.round == 0:
            return self.settings.schedule()
        return self.settings.schedule(start=self.round_start, settle_steps=rounds["settle_steps"],
                                      n_samples=rounds["n_samples"])

    def state(self) -> Dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "n_drawn": self.n_drawn, "status": self.status, "round": self.round, "round_start": self.round_start}

    def save(self, path: Optional[Path] = None) -> None:
        path = path or self.checkpoint_path
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.n_drawn, self.status = state["step"], state["n_drawn"], state["status"]
        self.round, self.round_start = state.get("round", 0), state.get("round_start", 0)
        if self.step >= self.settings.burnin_steps:
            self.fix_shared()


@dataclass
class _Job:
    """Everything a process needs to run its chains (picklable, for spawned processes)."""

    config: ModelConfig
    train: List[AtomicDataDict.Type]
    settings: SGMCMCSettings
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

    def chain(self, c: int, device: torch.device) -> _Chain:
        return _Chain(c, self.config, self.settings, self.stochastic, self.prior, len(self.train), self.work,
                      self.start, device)


def _chain_samples(path: Path, round_: int) -> Optional[Posterior]:
    """A chain's sample file, if it holds samples of round ``round_``."""
    if not path.is_file():
        return None
    samples = load_posterior(path)
    return samples if samples.hyperparameters.get("round", 0) == round_ else None


def _write_chain_samples(chain: _Chain, job: _Job) -> None:
    """Write ``chain.samples`` (its samples of this round) to the chain's sample file, atomically."""
    if not chain.samples:
        chain.samples_path.unlink(missing_ok=True)
        return
    shared = {n: t.detach().cpu().clone() for n, t in chain.model.state_dict().items() if n not in job.stochastic}
    stacked = {n: torch.stack([s[n] for s in chain.samples]) for n in job.stochastic}
    Posterior(job.config, shared, stacked, method="sgmcmc", hyperparameters={"round": chain.round, "chain": chain.chain},
              **job.metadata).save(chain.samples_path)


def assemble_posterior(job: _Job) -> Optional[Posterior]:
    """The posterior of all chains' samples of the current round (chain order), written to ``posterior.h5``;
    None while no chain has a sample."""
    parts = [(c, _chain_samples(job.work / f"samples_chain{c}.h5", job.rounds["round"]))
             for c in range(job.settings.n_chains)]
    parts = [(c, p) for c, p in parts if p is not None]
    if not parts:
        return None
    chains = [c for c, p in parts for _ in range(p.n_samples)]
    samples = {n: torch.cat([p.samples[n] for _, p in parts]) for n in job.stochastic}
    posterior = Posterior(job.config, parts[0][1].shared, samples, method="sgmcmc",
                          hyperparameters={**job.hyper, "sample_chains": chains, "round": job.rounds["round"]},
                          **job.metadata)
    posterior.save(job.out_dir / "posterior.h5")
    return posterior


def resolve_device(accelerator: str) -> torch.device:
    """The torch device of an ``accelerator`` setting: ``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(accelerator)


def _make_job(config: ModelConfig, train: List[AtomicDataDict.Type], settings: SGMCMCSettings, out_dir: Path,
              metadata: Optional[Dict], resume: bool, rounds: Dict) -> _Job:
    noise = settings_from(NoiseModel, settings.noise, "sgmcmc.noise")
    if noise.heteroscedastic and not config.noise_head:
        raise ValueError("sgmcmc.noise.heteroscedastic needs model.noise_head: true")
    template = build_model(config)
    stochastic = select_stochastic(template, settings.stochastic)
    partial = len(stochastic) < sum(1 for p in template.parameters() if p.requires_grad)
    prior = prior_from_spec(settings.prior, template, stochastic, "sgmcmc.prior")
    shapes = {n: p.shape for n, p in template.named_parameters()}
    start = pretrained_weights(settings.init, list(shapes), shapes) if settings.init else {}  # read once
    (Path(out_dir) / "sgmcmc").mkdir(parents=True, exist_ok=True)
    return _Job(config, train, settings, stochastic, prior, start, Path(out_dir), {**asdict(settings), "partial": partial},
                dict(metadata or {}), resume, rounds)


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

    Files in ``out_dir/sgmcmc``: ``chain<c>.ckpt`` (checkpoints), ``samples_chain<c>.h5`` (each chain's
    samples), ``trace_chain<c>.csv`` (potential terms, step sizes, gradient norms), ``diagnostics.json`` (ESS
    per layer, split-R̂ across chains), ``trace.png``. With ``resume``, chains continue from their checkpoints.
    """
    work = Path(out_dir) / "sgmcmc"
    if not resume and work.is_dir():  # a fresh run: nothing of an earlier run in this folder is reused
        for stale in [*work.glob("*.ckpt"), *work.glob("samples_chain*.h5"), work / "rounds.json"]:
            stale.unlink(missing_ok=True)
    job = _make_job(config, train, settings, out_dir, metadata, resume, {"round": 0})
    return _run_job(job)


def continue_sgmcmc(
    config: ModelConfig,
    train: List[AtomicDataDict.Type],
    settings: SGMCMCSettings,
    out_dir: Path,
    n_steps: int,
    n_samples: int,
    metadata: Optional[Dict] = None,
) -> Posterior:
    """Warm start: continue every chain of the run in ``out_dir`` on a new training set (e.g. one grown by
    active learning) and return the new posterior.

    Each chain goes on from its last checkpoint with ``num_data = len(train)``, takes ``n_steps`` steps at the
    target temperature with its frozen preconditioner (re-equilibration to the new posterior), then draws
    ``n_samples`` samples (thinning and cycles as in ``settings``, which must be the run's). The new samples
    replace the old ones in ``posterior.h5`` (they belong to another posterior). Diverged chains stay stopped.

    Idempotent: a continuation is identified by its data and arguments, so calling it again after a kill
    resumes it, and calling it again after it finished returns its posterior without sampling.
    """
    work = Path(out_dir) / "sgmcmc"
    if not any(work.glob("chain*.ckpt")):
        raise FileNotFoundError(f"{work} holds no SG-MCMC chain to continue; run the sampler first")
    if n_steps < 0 or n_samples < 1:
        raise ValueError(f"continue_sgmcmc needs n_steps >= 0 and n_samples >= 1, got {n_steps}, {n_samples}")
    key = _data_key(train, n_steps, n_samples)
    rounds_path = work / "rounds.json"
    rounds = json.loads(rounds_path.read_text()) if rounds_path.is_file() else {"round": 0, "key": None}
    if rounds["key"] != key:
        rounds = {"round": rounds["round"] + 1, "key": key, "settle_steps": n_steps, "n_samples": n_samples,
                  "num_data": len(train)}
        tmp = rounds_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rounds, indent=1))
        tmp.replace(rounds_path)
    job = _make_job(config, train, settings, out_dir, metadata, True, rounds)
    return _run_job(job)


def _data_key(train: List[AtomicDataDict.Type], n_steps: int, n_samples: int) -> str:
    digest = hashlib.sha256(f"{len(train)} {n_steps} {n_samples}".encode())
    for g in train:
        for key in (AtomicDataDict.POSITIONS_KEY, AtomicDataDict.ATOM_TYPE_KEY, AtomicDataDict.FORCE_KEY):
            digest.update(g[key].detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _run_job(job: _Job) -> Posterior:
    if job.partial and job.rounds["round"] == 0:
        _shared_burnin(job, resolve_device(job.settings.accelerator))
    n_processes = min(job.settings.n_processes, job.settings.n_chains)
    if n_processes == 1:
        _run_chains(job, 0, 1, resolve_device(job.settings.accelerator))
    else:
        from lightning.fabric import Fabric

        accelerator = resolve_device(job.settings.accelerator).type
        log.info("running %d chains in %d processes (%s)", job.settings.n_chains, n_processes, accelerator)
        Fabric(accelerator=accelerator, devices=n_processes, strategy="ddp_spawn").launch(_fabric_worker, job)
    posterior = assemble_posterior(job)
    if posterior is None:
        raise RuntimeError(f"no SG-MCMC sample was drawn; see the traces in {job.work}")
    write_diagnostics(posterior, job.work)
    return posterior


def _fabric_worker(fabric, job: _Job) -> None:
    from nequip.utils.global_state import set_global_state

    set_global_state()
    if fabric.device.type == "cpu":  # share the cores between the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // fabric.world_size))
    _run_chains(job, fabric.global_rank, fabric.world_size, fabric.device)


def _shared_burnin(job: _Job, device: torch.device) -> None:
    """One burn-in for every chain of a partially Bayesian model (``burnin.ckpt``): the fixed parameters are
    then the same in every sample. Run by chain 0's model; resumable from ``burnin_running.ckpt``."""
    done = job.work / "burnin.ckpt"
    if done.is_file():
        return
    chain = job.chain(0, device)
    chain.checkpoint_path = job.work / "burnin_running.ckpt"
    if job.resume and chain.checkpoint_path.is_file():
        chain.load(chain.checkpoint_path)
    _run_chain(chain, job, stop=job.settings.burnin_steps)
    chain.save(done)


def _run_chains(job: _Job, rank: int, world: int, device: torch.device) -> None:
    """Run chains ``rank, rank + world, ...`` of ``job``."""
    round_ = job.rounds["round"]
    for c in range(rank, job.settings.n_chains, world):
        chain = job.chain(c, device)
        if job.resume and chain.checkpoint_path.is_file():
            chain.load(chain.checkpoint_path)
        elif round_ > 0:
            raise FileNotFoundError(f"chain {c} has no checkpoint in {job.work} to continue from")
        elif job.partial:
            chain.load(job.work / "burnin.ckpt")
            chain.optimizer.reseed(chain.seed)
        if chain.round < round_ and chain.status != "diverged":
            chain.start_round(round_, len(job.train))
        # samples written after the chain's last checkpoint are dropped: the chain draws them again
        on_file = _chain_samples(chain.samples_path, chain.round)
        chain.samples = [on_file.sample_parameters(k) for k in range(chain.n_drawn)] if on_file else []
        _write_chain_samples(chain, job)
        if chain.status == "running":
            _run_chain(chain, job, stop=chain.schedule(job.rounds).end)
        elif chain.round < round_:
            log.warning("chain %d diverged in an earlier round and is not continued", c)


_TRACE_FIELDS = ["step", "phase", "temperature", "neg_log_likelihood", "neg_log_prior", "grad_norm",
                 "median_step_size"]


def _run_chain(chain: _Chain, job: _Job, stop: int) -> None:
    """Step ``chain`` until step ``stop``, drawing the samples its schedule asks for."""
    settings, schedule = job.settings, chain.schedule(job.rounds)
    noise = settings_from(NoiseModel, settings.noise, "sgmcmc.noise")
    # rows after the checkpoint being resumed from are written again
    kept = [r for r in csv.DictReader(open(chain.trace_path))] if chain.trace_path.is_file() else []
    trace_file = open(chain.trace_path, "w", newline="")
    writer = csv.DictWriter(trace_file, fieldnames=_TRACE_FIELDS)
    writer.writeheader()
    writer.writerows(r for r in kept if int(r["step"]) < chain.step)
    start = time.perf_counter()
    n = len(job.train)
    try:
        while chain.step < stop:
            step = chain.step
            temperature, lr = schedule.temperature_at(step), settings.lr * schedule.lr_factor(step)
            for group in chain.optimizer.param_groups:
                group["temperature"], group["lr"] = temperature, lr
            batch = AtomicDataDict.to_(minibatch(job.train, settings.batch_size, chain.seed, step), chain.device)
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
            if chain.step == schedule.burnin_end > schedule.start:
                chain.fix_shared()
            if step % settings.trace_every == 0:
                writer.writerow(_trace_row(chain, schedule, step, n * nll.item()))
            if schedule.sample_index(step) is not None:
                # a step can blow the parameters up while the loss it started from was finite: a sample must
                # predict finite values on the minibatch before it is kept
                check = neg_log_likelihood(chain.model(batch), batch, noise).mean()
                if not torch.isfinite(check):
                    chain.status = "diverged"
                    log.error("chain %d diverged at step %d (its sample predicts %s); it stops here, keeping its "
                              "%d samples", chain.chain, step, check.item(), chain.n_drawn)
                    break
                chain.n_drawn += 1
                chain.samples.append({name: chain.params[name].detach().cpu().clone() for name in job.stochastic})
                _write_chain_samples(chain, job)
                assemble_posterior(job)
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
    finally:
        trace_file.close()


def _trace_row(chain: _Chain, schedule: Schedule, step: int, neg_log_lik: float) -> Dict:
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
