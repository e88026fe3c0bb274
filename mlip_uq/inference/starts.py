"""SG-MCMC over several basins: independent starts, each sampled locally, pooled into one posterior.

One chain samples the basin it starts in: its draws stay near their start (ESS about 5 of 20 draws, R̂ 6.3 for
four chains from one MAP model), so its spread misses the disagreement between independent fits, which is most
of what grows out of distribution (Fort et al. 2019). The recipe here is that of MultiSWAG (Wilson & Izmailov
2020) and of many short chains from independent fits (Sommer et al. 2024), with the adaptive SGHMC as the local
sampler:

1. **starts** — ``sgmcmc.n_starts`` independent fits. With ``sgmcmc.init: map`` start ``s`` is a MAP fit from
   seed ``seed + s`` (its own initialisation and minibatch order) with the ``training`` settings: exactly
   member ``s`` of a deep ensemble of those settings (:func:`~mlip_uq.inference.ensemble.fit_ensemble`, in
   ``out_dir/starts/members/<s>/``, ``n_processes`` fits at a time), so an ensemble run's finished members can
   be copied there and reused. With ``init: null`` every start is a fresh initialisation from seed ``seed + s``
   (the burn-in is then the fit).
2. **local sampling** — each start's ``n_chains`` chains of :func:`~mlip_uq.inference.sgmcmc.run_sgmcmc` in
   ``out_dir/starts/<s>/`` (burn-in adapting that start's own preconditioner, then frozen; the prior centred on
   that start's fit when ``prior.center`` is ``map``), ``n_processes`` starts at a time.
3. **pooling** — :func:`pool_starts`: the draws of all starts concatenated start by start, each start given
   the same total weight (an equal mixture of the local posteriors, whatever the number of draws a diverged
   chain left); every draw labelled with its start (``sample_starts``) and chain (``sample_chains``, numbered
   across starts). Tensors equal in every start stay shared; in a partially Bayesian model the fixed trunk
   differs between starts and is stored per draw.

:func:`run_starts` and :func:`write_start_summary` write ``starts/starts.json``: per start the draws, the smallest per-layer median ESS of its
chains, the seconds of its fit and of its sampling, and over the validation set the share of the epistemic force
variance that lies *between* the starts (the rest is the spread within each start's draws).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from nequip.data import AtomicDataDict

from ..data import collate
from ..files import write_json
from ..model import ModelConfig
from ..posterior import Posterior, load_posterior
from ..posterior.predict import predict_samples
from ..settings import FROM_MAP
from . import FitContext
from .chains import NoDrawsError
from .common import run_in_processes

if TYPE_CHECKING:
    from .sgmcmc import SGMCMCSettings

log = logging.getLogger(__name__)

STARTS = "starts"
DRAWS = "draws.h5"  # a start's draws, with the noise as sampled (the pooled posterior's noise is fitted after)
#: marker file of a start whose continuation diverged (it is left out of the pooled posterior)
DIVERGED = "diverged.json"


def pool_starts(parts: Sequence[Posterior], hyperparameters: Optional[Dict] = None) -> Posterior:
    """One posterior of the draws of several starts.

    Args:
        parts: each start's posterior (one architecture; the draws of its chains, ``sample_chains`` in its
            hyperparameters when it has them).
        hyperparameters: recorded in the pooled posterior, with ``sample_starts`` (the start of every draw),
            ``sample_chains`` (its chain, numbered across starts: start ``s``'s chain ``c`` is
            ``s · n_chains + c``) and ``n_starts`` added.

    Returns:
        The draws of ``parts[0]``, then ``parts[1]``, ... (the architecture of ``parts[0]``, its seed the run's); start ``s``'s draws weighted ``w_k / n_starts`` with
        ``w_k`` their weights within the start. A tensor equal in every part stays shared; any other (a fixed
        trunk that differs between starts) is stored per draw.
    """
    if not parts:
        raise ValueError("pool_starts needs at least one start")
    config = parts[0].config

    def architecture(c: ModelConfig) -> Dict:  # the starts differ by their seeds only
        return {k: v for k, v in c.to_dict().items() if k != "seed"}

    for s, part in enumerate(parts[1:], start=1):
        if architecture(part.config) != architecture(config):
            raise ValueError(f"start {s} has another architecture than start 0")
    shared, samples = {}, {}
    for name in [*parts[0].shared, *parts[0].samples]:
        if all(name in p.shared and torch.equal(p.shared[name], parts[0].shared[name]) for p in parts):
            shared[name] = parts[0].shared[name]
        else:  # sampled, or fixed at a value of its own in each start
            samples[name] = torch.cat([p.samples[name] if name in p.samples else
                                       p.shared[name].expand(p.n_samples, *p.shared[name].shape) for p in parts])
    weights = torch.cat([p.weights / len(parts) for p in parts])
    starts, chains = [], []
    n_chains = max(max(p.hyperparameters.get("sample_chains", [0])) + 1 for p in parts)
    for s, part in enumerate(parts):
        local = part.hyperparameters.get("sample_chains", [0] * part.n_samples)
        starts += [s] * part.n_samples
        chains += [s * n_chains + int(c) for c in local]
    hyper = {**(hyperparameters or {}), "n_starts": len(parts), "sample_starts": starts, "sample_chains": chains}
    return Posterior(config, shared, samples, weights=weights, method=parts[0].method, hyperparameters=hyper,
                     energy_references=parts[0].energy_references, data_fingerprint=parts[0].data_fingerprint)


def between_start_share(posterior: Posterior, graphs: Sequence[AtomicDataDict.Type], batch_size: int = 8) -> Dict:
    """How the epistemic force variance of a pooled posterior splits into between and within starts.

    With start weights W_s = Σ_{k ∈ s} w_k, start means f̄_s and the pooled mean f̄, per force component

        Σ_k w_k (f_k - f̄)²  =  Σ_s W_s (f̄_s - f̄)²  +  Σ_s Σ_{k ∈ s} w_k (f_k - f̄_s)²
        (epistemic)            (between starts)        (within starts)

    summed over the components of ``graphs``.

    Returns:
        ``between_share`` (between / epistemic), ``epistemic_share`` (epistemic / predictive, the noise
        included) and the three sums (eV/Å)².
    """
    starts = np.asarray(posterior.hyperparameters["sample_starts"])
    w = posterior.weights.to(torch.float64)
    sums = {"epistemic": 0.0, "between": 0.0, "predictive": 0.0}
    for first in range(0, len(graphs), batch_size):
        batch = AtomicDataDict.to_(collate(list(graphs[first:first + batch_size])), posterior.device)
        pred = predict_samples(posterior, batch)
        f = pred.forces.to(torch.float64).cpu()
        mean = torch.einsum("k,k...->...", w, f)
        epistemic = torch.einsum("k,k...->...", w, (f - mean) ** 2).sum()
        between = 0.0
        for s in np.unique(starts):
            pick = torch.as_tensor(starts == s)
            weight = w[pick].sum()
            start_mean = torch.einsum("k,k...->...", w[pick] / weight, f[pick])
            between += float(weight * ((start_mean - mean) ** 2).sum())
        sums["epistemic"] += float(epistemic)
        sums["between"] += between
        sums["predictive"] += float(epistemic) + float(pred.forces_aleatoric_var().to(torch.float64).sum())
    return {"between_share": sums["between"] / sums["epistemic"] if sums["epistemic"] > 0 else float("nan"),
            "epistemic_share": sums["epistemic"] / sums["predictive"] if sums["predictive"] > 0 else float("nan"),
            "epistemic_var_sum": sums["epistemic"], "between_var_sum": sums["between"],
            "predictive_var_sum": sums["predictive"]}


@dataclass
class _StartJob:
    """One start's local sampling: its index, architecture (with the start's seed), settings and folder."""

    index: int
    config: ModelConfig
    settings: SGMCMCSettings  # this start's (its init and prior centre filled in)
    out_dir: Path


def _sample_start(job: _StartJob, train, metadata: Dict, resume: bool) -> None:
    """Run start ``job.index``'s chains (:func:`~mlip_uq.inference.sgmcmc.run_sgmcmc`) and write its draws
    (``draws.h5``); its sampling seconds go to ``start.json`` when it is done (a resumed start adds the seconds
    of each call)."""
    from .sgmcmc import run_sgmcmc

    record = job.out_dir / "start.json"
    done = json.loads(record.read_text()) if record.is_file() else {}
    if resume and done.get("finished"):
        return
    begin = time.perf_counter()
    log.info("start %d: sampling", job.index)
    run_sgmcmc(job.config, train, job.settings, job.out_dir, resume=resume, metadata=metadata).save(
        job.out_dir / DRAWS)
    seconds = done.get("sampling_seconds", 0.0) + time.perf_counter() - begin
    write_json({"start": job.index, "seed": job.config.seed, "init": job.settings.init,
                "sampling_seconds": seconds, "finished": True}, record)


def _start_jobs(context: FitContext[SGMCMCSettings], settings: SGMCMCSettings,
                fit: bool = True) -> Tuple[List[_StartJob], List[float]]:
    """Each start's sampling job, after the starts' MAP fits (``init: map``; run here when ``fit``, resumable;
    without ``fit`` they must be done); and the fits' training seconds."""
    from .ensemble import EnsembleSettings, fit_ensemble

    out = Path(context.out_dir) / STARTS
    config = context.model_config
    fit_seconds = [0.0] * settings.n_starts
    inits: List[Optional[str]] = [None] * settings.n_starts
    if settings.init == FROM_MAP:
        if fit:
            members = EnsembleSettings(n_members=settings.n_starts, n_processes=settings.n_processes,
                                       training=settings.training)
            begin = time.perf_counter()
            fit_ensemble(config, context.train, context.val, members, out, resume=context.resume,
                         metadata=context.metadata)
            log.info("%d MAP starts done (%.0f s)", settings.n_starts, time.perf_counter() - begin)
        inits = [str(out / "members" / str(s) / "final.pt") for s in range(settings.n_starts)]
        missing = [path for path in inits if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"the MAP fits of the starts are not done: {missing}")
        fit_seconds = [member_epoch_seconds(out / "members" / str(s)) for s in range(settings.n_starts)]
    jobs = []
    for s in range(settings.n_starts):
        center = inits[s] if settings.prior.center == FROM_MAP else settings.prior.center
        local = replace(settings, n_starts=1, n_processes=1, init=inits[s],
                        prior=replace(settings.prior, center=center), training=None)
        jobs.append(_StartJob(s, ModelConfig.from_dict({**config.to_dict(), "seed": config.seed + s}), local,
                              out / str(s)))
    return jobs, fit_seconds


def _pooled(jobs: List[_StartJob], settings: SGMCMCSettings) -> Posterior:
    """The draws of every start that has not diverged, pooled (equal weight per start)."""
    live = [job for job in jobs if not (job.out_dir / DIVERGED).is_file()]
    if not live:
        raise NoDrawsError(f"every start diverged; see {DIVERGED} in {jobs[0].out_dir.parent}/<start>/")
    parts = [load_posterior(job.out_dir / DRAWS) for job in live]
    hyper = {**parts[0].hyperparameters, "n_starts": settings.n_starts, "init": settings.init,
             "prior_center": settings.prior.center}
    return pool_starts(parts, hyper)


def run_starts(context: FitContext[SGMCMCSettings], settings: SGMCMCSettings,
               sample_on: Optional[Sequence[AtomicDataDict.Type]] = None) -> Posterior:
    """Method ``sgmcmc`` with ``n_starts > 1`` (module docstring); returns the pooled posterior (noise not yet
    fitted on the validation set: :func:`~mlip_uq.inference.sgmcmc.fit` does that).

    Args:
        context: the run's :class:`~mlip_uq.inference.FitContext` (the MAP fits train on ``context.train``,
            early-stopped on ``context.val``).
        settings: the run's SG-MCMC settings.
        sample_on: the graphs the chains sample on (default ``context.train``).
    """
    jobs, fit_seconds = _start_jobs(context, settings)
    run_in_processes(_sample_start, jobs, settings.n_processes, settings.accelerator,
                     train=list(context.train if sample_on is None else sample_on), metadata=context.metadata,
                     resume=context.resume)
    posterior = _pooled(jobs, settings)
    write_json({"starts": [start_record(job, fit_seconds[job.index]) for job in jobs]},
               Path(context.out_dir) / STARTS / "starts.json")
    return posterior


def _continue_start(job: _StartJob, train, metadata: Dict, n_steps: int, n_samples: int,
                    readapt_steps: int) -> None:
    """Warm-start every chain of start ``job.index`` on ``train`` (:func:`~mlip_uq.inference.sgmcmc.
    continue_sgmcmc`, idempotent) and write its new draws. A start whose chains all diverge gets a ``DIVERGED``
    marker and is left out of the pooled posterior from then on (the other starts go on)."""
    from .sgmcmc import continue_sgmcmc

    marker = job.out_dir / DIVERGED
    if marker.is_file():  # it stays out of the posterior
        return
    try:
        posterior = continue_sgmcmc(job.config, train, job.settings, job.out_dir, n_steps=n_steps,
                                    n_samples=n_samples, metadata=metadata, readapt_steps=readapt_steps)
    except NoDrawsError as error:
        log.warning("start %d diverged on the grown training set (%d structures): left out of the posterior "
                    "from now on", job.index, len(train))
        write_json({"num_data": len(train), "error": str(error)}, marker)
        return
    posterior.save(job.out_dir / DRAWS)


def update_starts(context: FitContext[SGMCMCSettings], settings: SGMCMCSettings, n_steps: int, n_samples: int,
                  index: int, readapt_steps: int = 0) -> Posterior:
    """Fit ``index`` of an active-learning loop with several starts: the first as :func:`run_starts` (MAP fits
    on ``context.train`` early-stopped on ``context.val``, then every chain on both), later ones continue every
    start's chains on the grown ``train + val`` (:func:`~mlip_uq.inference.sgmcmc.continue_sgmcmc`:
    ``readapt_steps`` noise-free steps re-adapting the preconditioner, ``n_steps`` steps at the target
    temperature, then ``n_samples`` new draws per chain), ``n_processes`` starts at a time; returns the pooled
    posterior."""
    graphs = list(context.train) + list(context.val)
    if index == 0:
        return run_starts(context, settings, sample_on=graphs)
    jobs, _ = _start_jobs(context, settings, fit=False)  # the fits of update 0 stay the starts
    run_in_processes(_continue_start, jobs, settings.n_processes, settings.accelerator, train=graphs,
                     metadata=context.metadata, n_steps=n_steps, n_samples=n_samples, readapt_steps=readapt_steps)
    return _pooled(jobs, settings)


def start_record(job: _StartJob, fit_seconds: float) -> Dict:
    """One start's line of ``starts.json``: draws, ESS, seconds."""
    record = json.loads((job.out_dir / "start.json").read_text())
    part = load_posterior(job.out_dir / DRAWS)
    diagnostics_path = job.out_dir / "sgmcmc" / "diagnostics.json"
    layers = json.loads(diagnostics_path.read_text()).get("layers", {}) if diagnostics_path.is_file() else {}
    ess = [entry["ess_median"] for entry in layers.values()]
    return {"start": job.index, "seed": job.config.seed, "n_draws": part.n_samples,
            "ess_min_layer_median": min(ess) if ess else None, "fit_seconds": fit_seconds,
            "sampling_seconds": record["sampling_seconds"]}


def member_epoch_seconds(member_dir: Path) -> float:
    """The training seconds of a MAP fit: the sum of the epoch seconds in its ``logs/metrics.csv`` (right after
    a resume, unlike a wall clock; 0 where the log is absent, e.g. a start copied without it)."""
    path = Path(member_dir) / "logs" / "metrics.csv"
    if not path.is_file():
        return 0.0
    with open(path) as f:
        return float(sum(float(r["seconds"]) for r in csv.DictReader(f) if r.get("seconds")))


def write_start_summary(posterior: Posterior, out_dir: Path, val: Sequence[AtomicDataDict.Type],
                        batch_size: int) -> Dict:
    """Add the between-start share of the epistemic force variance on ``val`` to ``starts/starts.json``."""
    path = Path(out_dir) / STARTS / "starts.json"
    summary = json.loads(path.read_text())
    summary["validation"] = between_start_share(posterior, val, batch_size) if val else None
    summary["fit_seconds"] = sum(s["fit_seconds"] for s in summary["starts"])
    summary["sampling_seconds"] = sum(s["sampling_seconds"] for s in summary["starts"])
    write_json(summary, path)
    return summary
