"""The SG-MCMC driver: burn-in, pre-heat, thinned or cyclical sampling, chains in sequence or in parallel
processes, warm-start continuation, checkpoints and diagnostics.

The update itself is :class:`~mlip_uq.inference.sghmc.AdaptiveSGHMC`; this module owns everything around it
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
``c`` on process ``c % n_processes``; a chain's samples do not depend on where it ran, up to the
floating-point summation order of torch's threaded CPU kernels (a process gets ``cpu_count // n_processes``
threads, a chain run in this process torch's default).

Each chain's samples go to ``sgmcmc/samples_chain<c>.h5`` as they are drawn and the chain is checkpointed with
each (all writes atomic), so a killed run resumes from its last checkpoints without losing or repeating
samples; the posterior is assembled from the chain files when the chains are done, and ``posterior.h5`` is
written by :func:`fit` / :func:`update` once it is final (a killed run leaves no ``posterior.h5`` that differs
from the finished run's). A NaN/inf stops the chain with a message and
keeps the samples drawn before it.

:func:`continue_sgmcmc` warm-starts every chain of a finished run on a new (e.g. grown) training set: a
re-equilibration at the target temperature with the frozen preconditioner, then new samples that replace the
old ones ("rounds"); it is idempotent, so a killed continuation is resumed by calling it again.

The step plan is :mod:`~mlip_uq.inference.schedule`, a chain and its files :mod:`~mlip_uq.inference.chains`, the
diagnostics output :func:`~mlip_uq.inference.diagnostics.write_diagnostics`. As a method of the table in
:mod:`mlip_uq.inference` this module exports ``Settings`` (:class:`SGMCMCSettings`), :func:`fit`,
:func:`artifacts`, :func:`map_start` and :func:`update`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import torch
from nequip.data import AtomicDataDict

from ..files import atomic_write
from ..model import ModelConfig, build_model
from ..posterior import Posterior
from ..settings import FROM_MAP, ConfigError, settings_from
from . import Artifacts, FitContext, MapStart, trains_map_alike
from .chains import Job, NoDrawsError, assemble_posterior, chain_samples, run_chain, write_chain_samples
from .common import fit_map_once, resolve_device
from .diagnostics import write_diagnostics
from .loss import LossWeights
from .noise import fit_posterior_noise_on_validation
from .options import PriorSettings, check_no_dropout, likelihood_options, map_options
from .priors import pretrained_weights, prior_from_spec, select_stochastic
from .schedule import Schedule
from .starts import STARTS, run_starts, update_starts, write_start_summary
from .trainer import MAPSettings, training_curves

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
        n_chains: number of chains (per start).
        n_starts: independent starts (:mod:`~mlip_uq.inference.starts`): with ``init: map`` each start is its
            own MAP fit from seed ``seed + s`` (a deep ensemble's member ``s``), with ``init: null`` its own fresh
            initialisation; each start's chains sample around it, and the draws of all starts are pooled into
            one posterior, each start with the same weight. 1: one start (the chains of ``init``).
        cycle_steps: None = constant step size; else the sampling phase is made of cosine cycles of this many
            steps, η_t = lr · (1 + cos(π t / cycle_steps)) / 2 restarting at lr every cycle.
        exploration_fraction: with ``cycle_steps``, the first part of each cycle runs noise-free (exploration);
            samples are drawn in the rest.
        n_processes: chains run in this many processes (Lightning Fabric, ``ddp_spawn``; one device each with
            a GPU accelerator); 1 = one after the other in this process. With ``n_starts`` > 1: the starts' MAP
            fits and then their sampling, this many starts at a time in CPU processes sharing the cores (their
            chains one after the other within a start).
        accelerator: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        stochastic: which parameters are sampled: ``all``, ``{last_layers: N}`` or ``{patterns: [...]}``.
        init: start every chain from pre-trained weights (a posterior file or checkpoint, matched as prior
            centres are) instead of a fresh initialisation; ``map``: from a MAP model trained first in the same
            run (:data:`FROM_MAP`; one per start); None: a fresh initialisation (the burn-in is the fit).
        prior: ``{scale: s, layer_scales: {layer: s}, center: null | path | map}`` — Gaussian prior; ``center``
            a posterior file or checkpoint of a pre-trained model (transfer-learning prior), or ``map``: the
            run's own MAP model.
        likelihood_weights: ``{energy, forces, stress}``: each label term of the likelihood raised to its weight
            (a power likelihood, :func:`~mlip_uq.inference.loss.neg_log_likelihood`); all 1 (default): the
            posterior itself. Set them to a MAP start's ``training.loss_weights`` to sample around the objective
            it was trained on (e.g. energy 20 on TiO2, where one energy label per frame meets ~64 force
            components).
        noise_from_validation: after sampling, set every sample's learned noise stds to their maximum-likelihood
            values on the validation split, as MAP training and every ensemble member do, then scale all of them
            by one factor per quantity fitted with the samples' spread included
            (:func:`~mlip_uq.inference.noise.fit_posterior_noise_on_validation`); the chains' own samples stay in
            ``sgmcmc/samples_chain<c>.h5``. Only in ``method: sgmcmc`` (an active-learning update has no
            validation split).
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
    n_starts: int = 1
    cycle_steps: Optional[int] = None
    exploration_fraction: float = 0.5
    n_processes: int = 1
    accelerator: str = "auto"
    stochastic: Union[str, Dict] = "all"
    init: Optional[str] = None
    prior: PriorSettings = field(default_factory=PriorSettings)
    likelihood_weights: LossWeights = field(default_factory=LossWeights)
    noise_from_validation: bool = True
    checkpoint_every: int = 500
    trace_every: int = 10
    beta2: float = 0.999
    eps: float = 1e-8
    training: Optional[MAPSettings] = None

    PATHS: ClassVar[Tuple[str, ...]] = ("sgmcmc.init", "sgmcmc.prior.center")

    def uses_map(self) -> bool:
        """Whether the run starts by training its own MAP model (``init`` or ``prior.center`` is ``map``)."""
        return FROM_MAP in (self.init, self.prior.center)

    @classmethod
    def from_dict(cls, config: Dict) -> "SGMCMCSettings":
        """From a run configuration: the ``sgmcmc`` section, ``prior`` and ``stochastic`` parsed.

        Raises:
            ConfigError: a mistyped option; ``model.dropout``; ``sgmcmc.noise`` (the noise is the model's).
        """
        model = config.get("model", {})
        check_no_dropout(model, "sgmcmc")
        values = likelihood_options(config.get("sgmcmc"), "sgmcmc")
        if "training" in values:
            raise ConfigError("the MAP phase's settings go in the training section, not sgmcmc.training")
        settings = settings_from(cls, values, "sgmcmc")
        if settings.uses_map():
            settings.training = MAPSettings.from_dict(config.get("training"))
        return settings

    def __post_init__(self):
        for name in ("batch_size", "n_samples", "thinning", "n_chains", "n_starts", "n_processes",
                     "checkpoint_every", "trace_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"sgmcmc.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.burnin_steps < 1 or self.preheat_steps < 0:
            raise ConfigError("sgmcmc.burnin_steps must be >= 1 and sgmcmc.preheat_steps >= 0")
        if self.accelerator not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"sgmcmc.accelerator must be auto, cpu or cuda, got {self.accelerator!r}")
        if self.n_starts > 1 and self.init not in (None, FROM_MAP):
            raise ConfigError(f"sgmcmc.n_starts={self.n_starts} with sgmcmc.init={self.init!r}: every start would "
                              "begin at the same weights and sample one basin; use init: map (a MAP fit per start) "
                              "or null (a fresh initialisation per start)")
        if self.n_starts > 1 and self.prior.center == FROM_MAP and self.init != FROM_MAP:
            raise ConfigError("sgmcmc.prior.center: map with several starts centres each start's prior on its own "
                              "MAP fit; it needs sgmcmc.init: map")
        if self.cycle_steps is not None:
            if not 0 <= self.exploration_fraction < 1:
                raise ConfigError(f"sgmcmc.exploration_fraction must be in [0, 1), got {self.exploration_fraction}")
            if self.schedule().per_cycle < 1:
                raise ConfigError(
                    f"sgmcmc.cycle_steps={self.cycle_steps} leaves no room for a sample: the sampling part of a "
                    f"cycle ({self.cycle_steps - self.schedule().exploration_steps} steps) is shorter than "
                    f"thinning={self.thinning}"
                )

    def schedule(self, start: int = 0, settle_steps: int = 0, n_samples: Optional[int] = None,
                 readapt_steps: int = 0) -> Schedule:
        """The step plan of a chain: from step 0 with burn-in and pre-heat (a run), or, for a warm start, from
        ``start`` with ``readapt_steps`` of burn-in (noise-free, the preconditioner adapting again), then
        ``settle_steps`` at the target temperature and ``n_samples`` samples (a continuation)."""
        first_run = start == 0
        burnin_end = self.burnin_steps if first_run else start + readapt_steps
        preheat_end = burnin_end + (self.preheat_steps if first_run else 0)
        exploration = 0 if self.cycle_steps is None else int(math.ceil(self.exploration_fraction * self.cycle_steps))
        return Schedule(start=start, burnin_end=burnin_end, preheat_end=preheat_end,
                        sampling_start=preheat_end + settle_steps,
                        n_samples=self.n_samples if n_samples is None else n_samples, thinning=self.thinning,
                        temperature=self.temperature, cycle_steps=self.cycle_steps, exploration_steps=exploration)


def _make_job(config: ModelConfig, train: List[AtomicDataDict.Type], settings: SGMCMCSettings, out_dir: Path,
              metadata: Optional[Dict], resume: bool, rounds: Dict) -> Job:
    template = build_model(config)
    stochastic = select_stochastic(template, settings.stochastic)
    partial = len(stochastic) < sum(1 for p in template.parameters() if p.requires_grad)
    prior = prior_from_spec(settings.prior, template, stochastic)
    shapes = {n: p.shape for n, p in template.named_parameters()}
    start = pretrained_weights(settings.init, list(shapes), shapes) if settings.init else {}  # read once
    (Path(out_dir) / "sgmcmc").mkdir(parents=True, exist_ok=True)
    return Job(config, train, settings, stochastic, prior, start, Path(out_dir), {**asdict(settings), "partial": partial},
               dict(metadata or {}), resume, rounds)


def run_sgmcmc(
    config: ModelConfig,
    train: List[AtomicDataDict.Type],
    settings: SGMCMCSettings,
    out_dir: Path,
    resume: bool = False,
    metadata: Optional[Dict] = None,
) -> Posterior:
    """Sample the posterior of ``config``'s parameters given the ``train`` graphs; returns the Posterior (the
    caller writes it: :func:`fit`, :func:`update`).

    Files in ``out_dir/sgmcmc``: ``chain<c>.ckpt`` (checkpoints), ``samples_chain<c>.h5`` (each chain's
    samples), ``trace_chain<c>.csv`` (potential terms, step sizes, gradient norms), ``diagnostics.json`` (ESS
    per layer, split-R̂ across chains), ``trace.png``. With ``resume``, chains continue from their checkpoints.
    """
    work = Path(out_dir) / "sgmcmc"
    # a fresh run: nothing of an earlier run in this folder is reused (``mlip-uq train`` refuses a folder that
    # holds a run unless told --overwrite; an active-learning loop refuses one unless resumed)
    if not resume and work.is_dir():
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
    readapt_steps: int = 0,
) -> Posterior:
    """Warm start: continue every chain of the run in ``out_dir`` on a new training set (e.g. one grown by
    active learning) and return the new posterior.

    Each chain goes on from its last checkpoint with ``num_data = len(train)``, takes ``readapt_steps``
    noise-free steps in which its preconditioner adapts again (:meth:`AdaptiveSGHMC.thaw_preconditioner`, then
    frozen), ``n_steps`` steps at the target temperature (re-equilibration to the new posterior), then draws
    ``n_samples`` samples (thinning and cycles as in ``settings``, which must be the run's). The new samples
    replace the old ones in the returned posterior (they belong to another posterior). Diverged chains stay
    stopped.

    Idempotent: a continuation is identified by its data and arguments, so calling it again after a kill
    resumes it, and calling it again after it finished returns its posterior without sampling.
    """
    work = Path(out_dir) / "sgmcmc"
    if not any(work.glob("chain*.ckpt")):
        raise FileNotFoundError(f"{work} holds no SG-MCMC chain to continue; run the sampler first")
    if n_steps < 0 or n_samples < 1 or readapt_steps < 0:
        raise ValueError("continue_sgmcmc needs n_steps >= 0, n_samples >= 1 and readapt_steps >= 0, got "
                         f"{n_steps}, {n_samples}, {readapt_steps}")
    key = _data_key(train, n_steps, n_samples, readapt_steps)
    rounds_path = work / "rounds.json"
    rounds = json.loads(rounds_path.read_text()) if rounds_path.is_file() else {"round": 0, "key": None}
    if rounds["key"] != key:
        rounds = {"round": rounds["round"] + 1, "key": key, "settle_steps": n_steps, "n_samples": n_samples,
                  "readapt_steps": readapt_steps, "num_data": len(train)}
        with atomic_write(rounds_path) as tmp:
            tmp.write_text(json.dumps(rounds, indent=1))
    job = _make_job(config, train, settings, out_dir, metadata, True, rounds)
    return _run_job(job)


def _data_key(train: List[AtomicDataDict.Type], n_steps: int, n_samples: int, readapt_steps: int) -> str:
    text = f"{len(train)} {n_steps} {n_samples}" + (f" {readapt_steps}" if readapt_steps else "")  # as before
    digest = hashlib.sha256(text.encode())  # without re-adaptation: the keys of existing runs stay valid
    for g in train:
        for key in (AtomicDataDict.POSITIONS_KEY, AtomicDataDict.ATOM_TYPE_KEY, AtomicDataDict.FORCE_KEY):
            digest.update(g[key].detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _run_job(job: Job) -> Posterior:
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
        raise NoDrawsError(f"no SG-MCMC sample was drawn; see the traces in {job.work}")
    write_diagnostics(posterior, job.work)
    return posterior


def _fabric_worker(fabric, job: Job) -> None:
    from nequip.utils.global_state import set_global_state

    set_global_state()
    if fabric.device.type == "cpu":  # share the cores between the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // fabric.world_size))
    _run_chains(job, fabric.global_rank, fabric.world_size, fabric.device)


def _shared_burnin(job: Job, device: torch.device) -> None:
    """One burn-in for every chain of a partially Bayesian model (``burnin.ckpt``): the fixed parameters are
    then the same in every sample. Run by chain 0's model; resumable from ``burnin_running.ckpt``."""
    done = job.work / "burnin.ckpt"
    if done.is_file():
        return
    chain = job.chain(0, device)
    chain.checkpoint_path = job.work / "burnin_running.ckpt"
    if job.resume and chain.checkpoint_path.is_file():
        chain.load(chain.checkpoint_path)
    run_chain(chain, job, stop=job.settings.burnin_steps)
    chain.save(done)


def _run_chains(job: Job, rank: int, world: int, device: torch.device) -> None:
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
            chain.start_round(round_, len(job.train), readapt=job.rounds.get("readapt_steps", 0) > 0)
        # samples written after the chain's last checkpoint are dropped: the chain draws them again
        on_file = chain_samples(chain.samples_path, chain.round)
        chain.samples = [on_file.sample_parameters(k) for k in range(chain.n_drawn)] if on_file else []
        write_chain_samples(chain, job)
        if chain.status == "running":
            run_chain(chain, job, stop=chain.schedule(job.rounds).end)
        elif chain.round < round_:
            log.warning("chain %d diverged in an earlier round and is not continued", c)


Settings = SGMCMCSettings


def fit(context: FitContext[SGMCMCSettings]) -> Posterior:
    """Method ``sgmcmc``: :func:`run_sgmcmc` on ``context.train`` (the sampler has no early stopping), then the
    noise stds of the draws fitted to the validation graphs (``sgmcmc.noise_from_validation``); ``posterior.h5``
    is written once, with the final posterior (the draws so far live in each chain's
    ``sgmcmc/samples_chain<c>.h5``).

    With ``sgmcmc.init`` or ``sgmcmc.prior.center`` set to ``map`` the run first trains a MAP model with the
    ``training`` section (:func:`~mlip_uq.inference.common.fit_map_once` in ``out_dir/map``: resumable, early
    stopping on the validation graphs) and the chains start from it and/or the prior is centred on it. With
    ``sgmcmc.n_starts`` > 1 there is one start per basin (:func:`~mlip_uq.inference.starts.run_starts`: a MAP
    fit or a fresh initialisation each, sampled locally, pooled), and ``starts/starts.json`` reports each start's
    draws, ESS and seconds and the between-start share of the epistemic force variance on the validation set.
    """
    settings = context.settings
    if settings.n_starts > 1:
        posterior = run_starts(context, settings)
    else:
        if settings.uses_map():
            model = build_model(context.model_config)
            fit_map_once(model, context.train, context.val, settings.training, Path(context.out_dir) / "map",
                         seed=context.model_config.seed, resume=context.resume)
            start = str(Path(context.out_dir) / "map" / "final.pt")
            init, center = (start if value == FROM_MAP else value for value in (settings.init, settings.prior.center))
            settings = replace(settings, init=init, prior=replace(settings.prior, center=center))
        posterior = run_sgmcmc(context.model_config, context.train, settings, context.out_dir,
                               resume=context.resume, metadata=context.metadata)
    if settings.noise_from_validation and context.val:
        posterior = fit_posterior_noise_on_validation(posterior, context.val, settings.batch_size)
    if settings.n_starts > 1:
        write_start_summary(posterior, context.out_dir, context.val, settings.batch_size)
    posterior.save(context.posterior_path)
    return posterior


def artifacts(out_dir: Path) -> Artifacts:
    """The posterior file and the validation curves of the MAP fits (``map``, ``starts/members/<s>``)."""
    return Artifacts(Path(out_dir) / "posterior.h5", training_curves(out_dir, "map", f"{STARTS}/members/*"))


def map_start(config: Mapping[str, Any], map_config: Mapping[str, Any]) -> Optional[MapStart]:
    """With one start, ``sgmcmc.init`` and ``sgmcmc.prior.center`` ``map`` take the MAP run's posterior file
    when the runs share the sections a MAP fit reads (:func:`~mlip_uq.inference.trains_map_alike`); several
    starts have a MAP fit each (None)."""
    options = map_options(config, "sgmcmc")
    if not options or (config.get("sgmcmc") or {}).get("n_starts", 1) != 1 or not trains_map_alike(config, map_config):
        return None
    return MapStart(options=options)


@dataclass
class UpdateSettings:
    """Active-learning updates of an SG-MCMC posterior (the ``update`` section).

    Args:
        settle_steps: re-equilibration steps of every chain at the target temperature on the grown training set.
        n_samples: new samples per chain and update (None: ``sgmcmc.n_samples``).
        readapt_steps: noise-free steps before settling in which the preconditioner adapts again, to the grown
            set's gradients, then is frozen anew (its running maximum is kept, so a step size can only shrink);
            0 keeps the preconditioner of the first burn-in. A new structure whose forces are far larger than
            the training set's makes gradients the first preconditioner never saw: with 0, one such label
            (max force 28 eV/Å against 2-8) sent the acac on-the-fly posterior to a test force MAE of 8.8 eV/Å.
    """

    settle_steps: int = 200
    n_samples: Optional[int] = None
    readapt_steps: int = 0

    @classmethod
    def from_dict(cls, values: Dict, settings: SGMCMCSettings) -> "UpdateSettings":
        options = settings_from(cls, values, "update")
        if options.settle_steps < 0 or options.readapt_steps < 0:
            raise ConfigError(f"update.settle_steps and update.readapt_steps must be >= 0, got "
                              f"{options.settle_steps} and {options.readapt_steps}")
        if options.n_samples is None:
            options.n_samples = settings.n_samples
        return options


def update(context: FitContext[SGMCMCSettings], options: UpdateSettings, index: int) -> Path:
    """Fit ``index`` of an active-learning loop on ``train + val`` (sampling has no early stopping): the first
    (``index`` 0) is :func:`run_sgmcmc`, later ones continue every chain with :func:`continue_sgmcmc`. Both are
    checkpointed: a killed update is finished by calling it again. Returns ``out_dir/posterior.h5``.

    With ``sgmcmc.n_starts`` > 1: :func:`~mlip_uq.inference.starts.update_starts` (the starts' MAP fits, with
    ``init: map``, train on ``train`` and stop early on ``val``, as an ensemble's members do; the chains sample
    on both, and later fits continue every start's chains)."""
    if context.settings.n_starts > 1:
        posterior = update_starts(context, context.settings, options.settle_steps, options.n_samples, index,
                                  readapt_steps=options.readapt_steps)
        posterior.save(context.posterior_path)
        return context.posterior_path
    if context.settings.uses_map():
        raise ConfigError("an active-learning update of one start samples on train + val, with no validation "
                          "split left for a MAP phase: set sgmcmc.init and sgmcmc.prior.center to a trained "
                          "model's file (or null), not map, or use sgmcmc.n_starts > 1")
    graphs = list(context.train) + list(context.val)
    if index == 0:
        posterior = run_sgmcmc(context.model_config, graphs, context.settings, context.out_dir,
                               resume=context.resume, metadata=context.metadata)
    else:
        posterior = continue_sgmcmc(context.model_config, graphs, context.settings, context.out_dir,
                                    n_steps=options.settle_steps, n_samples=options.n_samples,
                                    metadata=context.metadata, readapt_steps=options.readapt_steps)
    posterior.save(context.posterior_path)
    return context.posterior_path
