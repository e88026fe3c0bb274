"""The observation noise fitted on held-out data, after training: one model's learned noise stds
(:func:`fit_noise_on_validation`), every sample's of a posterior (:func:`fit_posterior_noise_on_validation`) and
the factors on all samples' stds with their spread included (:func:`posterior_noise_factors`).
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List

import numpy as np
import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModel
from scipy.optimize import minimize_scalar

from .._keys import ENERGY_LOG_SIGMA_KEY, PER_ATOM_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY
from ..data import collate
from ..model import build_model
from ..model.build import ObservationNoise
from ..posterior import Posterior
from ..posterior.predict import predict_samples, predictive_moments
from .loss import errors

log = logging.getLogger(__name__)


def fit_noise_on_validation(model: GraphModel, batches: List[AtomicDataDict.Type]) -> Dict[str, float]:
    """Set the learned noise stds of ``model`` to their maximum-likelihood values on held-out ``batches``, in place.

    The rest of the model stays as it is, the noise head included: each element's force log-factor, the energy
    log-factor and (where the batches have stress) the stress log-factor move by the constant that maximises the
    Gaussian likelihood of the held-out errors, i.e. the log of the root mean square of the errors in units of
    the current stds (per element for forces). With a noise head the factors of the atoms keep their ratios.
    A term without held-out labels (an element absent from the batches) keeps its std; fixed noise (buffers,
    ``model.noise: fixed``) is not changed.

    Returns:
        The factor each std was multiplied by: ``{"forces_<element>": ..., "energy": ..., "stress": ...}``.
    """
    noise = next((m for m in model.modules() if isinstance(m, ObservationNoise)), None)
    if noise is None or not isinstance(noise.force_log_factor, torch.nn.Parameter):
        return {}
    device = noise.force_log_factor.device
    n_types = noise.force_log_factor.shape[0]
    force_sums = torch.zeros(n_types, dtype=torch.float64, device=device)
    force_counts = torch.zeros(n_types, dtype=torch.float64, device=device)
    sums = {"energy": torch.zeros((), dtype=torch.float64, device=device),
            "stress": torch.zeros((), dtype=torch.float64, device=device)}
    counts = {"energy": 0, "stress": 0}
    training = model.training
    model.eval()
    for batch in batches:
        batch = AtomicDataDict.to_(dict(batch), device)
        out = model(dict(batch))
        e_err, f_err, s_err = errors(out, batch)
        z = (f_err.detach() * torch.exp(-out[PER_ATOM_LOG_SIGMA_KEY].detach().view(-1, 1))).double()
        types = batch[AtomicDataDict.ATOM_TYPE_KEY].view(-1)
        force_sums.index_add_(0, types, z.square().sum(-1))
        force_counts.index_add_(0, types, torch.full_like(types, 3, dtype=torch.float64))
        standardised = {"energy": e_err.detach() * torch.exp(-out[ENERGY_LOG_SIGMA_KEY].detach().view(-1)),
                        "stress": None if s_err is None else
                        s_err.detach() * torch.exp(-out[STRESS_LOG_SIGMA_KEY].detach().view(-1, 1))}
        for name, values in standardised.items():
            if values is not None:
                values = values[torch.isfinite(values)]  # frames without a stress label (no volume) are NaN
                sums[name] += values.double().square().sum()
                counts[name] += values.numel()
    model.train(training)
    factors = {}
    with torch.no_grad():
        fitted = (force_counts > 0) & (force_sums > 0)  # a zero error has no finite maximum-likelihood std
        shift = torch.where(fitted, 0.5 * torch.log(force_sums.clamp(min=1e-300) / force_counts.clamp(min=1)), 0.0)
        noise.force_log_factor += shift.to(noise.force_log_factor.dtype)
        for name, t in zip(model.type_names, shift.exp().tolist()):
            factors[f"forces_{name}"] = t
        for name, parameter in (("energy", noise.energy_log_factor), ("stress", noise.stress_log_factor)):
            if counts[name] and float(sums[name]) > 0:
                step = 0.5 * math.log(float(sums[name]) / counts[name])
                parameter += step
                factors[name] = math.exp(step)
    log.info("noise stds fitted to the %d validation frames: multiplied by %s", sum(
        AtomicDataDict.num_frames(b) for b in batches), ", ".join(f"{k} {v:.3g}" for k, v in factors.items()))
    return factors


def fit_posterior_noise_on_validation(posterior: Posterior, val: List[AtomicDataDict.Type], batch_size: int = 8,
                                      per_sample: bool = True) -> Posterior:
    """``posterior`` with its learned noise stds fitted to the held-out graphs ``val``, in two steps.

    1. With ``per_sample``: every sample's noise stds set to their maximum-likelihood values for that sample's
       energy model alone (:func:`fit_noise_on_validation`), as every ensemble member's are after training. A
       sampler that starts from a MAP model anneals its noise back to the training errors during its noise-free
       burn-in, and on a small training set the noise's posterior stays there (ethanol-50, one SG-MCMC chain:
       raw force miscalibration area 0.17, the per-sample held-out factors 2.7-4.7). Noise parameters shared by
       all samples (not stochastic) are fitted once, with the first sample's energy model.
    2. With more than one sample: one factor per observed quantity (forces, energy) on the noise std of every
       sample at once (:func:`posterior_noise_factors`), fitted with the samples' spread in the predictive
       variance. A noise fitted to one model's held-out errors already holds that model's own error, and the
       predictive adds the spread of the samples on top: counted twice, the stds come out too wide (ethanol-50,
       5-member ensemble: raw force miscalibration area 0.125; with this step 0.028 and the force NLL -1.69 ->
       -1.78).

    Fixed noise (buffers, ``model.noise: fixed``) is not changed; stress noise keeps its per-sample fit.
    """
    model = build_model(posterior.config)
    noise = next(((name, m) for name, m in model.named_modules() if isinstance(m, ObservationNoise)), None)
    if noise is None:
        return posterior
    names = [f"{noise[0]}.{name}" for name, _ in noise[1].named_parameters()]
    sampled = [n for n in names if n in posterior.samples]
    shared_noise = [n for n in names if n in posterior.shared]
    if not sampled and not shared_noise:
        return posterior
    samples = {n: t.clone() if n in sampled else t for n, t in posterior.samples.items()}
    shared = {n: t.clone() if n in shared_noise else t for n, t in posterior.shared.items()}
    if per_sample:
        batches = [collate(val[i:i + batch_size]) for i in range(0, len(val), batch_size)]
        for k in range(posterior.n_samples if sampled else 1):
            model.load_state_dict(posterior.state_dict(k))
            fit_noise_on_validation(model, batches)
            fitted = model.state_dict()
            for n in sampled:
                samples[n][k] = fitted[n].to(samples[n])
            for n in shared_noise if k == 0 else ():
                shared[n] = fitted[n].to(shared[n]).clone()
        posterior = posterior.replace(samples=samples, shared=shared, weights=posterior.weights)
    if posterior.n_samples < 2:
        return posterior
    factors = posterior_noise_factors(posterior, val, batch_size)
    for quantity, parameter in (("forces", "force_log_factor"), ("energy", "energy_log_factor")):
        name = f"{noise[0]}.{parameter}"
        if quantity in factors:
            store = samples if name in sampled else shared
            store[name] = store[name] + math.log(factors[quantity])
    log.info("noise stds of all %d samples multiplied by %s (validation NLL with the samples' spread)",
             posterior.n_samples, ", ".join(f"{k} {v:.3g}" for k, v in factors.items()))
    return posterior.replace(samples=samples, shared=shared, weights=posterior.weights)


def posterior_noise_factors(posterior: Posterior, val: List[AtomicDataDict.Type], batch_size: int = 8,
                            bound: float = 100.0) -> Dict[str, float]:
    """The factors ``c`` on the noise std of all samples of ``posterior`` that minimise the Gaussian negative
    log-likelihood of the held-out graphs ``val`` under the predictive variance ``spread + c² noise``: one for
    the force components, one for the total energies (a quantity whose held-out errors or noise are all zero
    gets none). Searched on log ``c`` within ``[1/bound, bound]``.
    """
    parts: Dict[str, List[np.ndarray]] = {"forces": [], "energy": []}
    for start in range(0, len(val), batch_size):
        batch = AtomicDataDict.to_(collate(val[start:start + batch_size]), posterior.device)
        m = predictive_moments(predict_samples(posterior, batch))
        truth = {"energy": batch[AtomicDataDict.TOTAL_ENERGY_KEY].view(-1), "forces": batch[AtomicDataDict.FORCE_KEY]}
        for quantity, mean, std, spread in (("energy", m.energy, m.energy_std, m.energy_std_epistemic),
                                            ("forces", m.forces, m.forces_std, m.forces_std_epistemic)):
            error = truth[quantity].detach().cpu().double().numpy() - mean
            parts[quantity].append(np.stack([error.ravel() ** 2, spread.ravel() ** 2,
                                             std.ravel() ** 2 - spread.ravel() ** 2]))
    factors = {}
    for quantity, chunks in parts.items():
        squared_error, spread_var, noise_var = np.concatenate(chunks, axis=1)
        keep = np.isfinite(squared_error)
        squared_error, spread_var, noise_var = squared_error[keep], spread_var[keep], noise_var[keep].clip(min=0)
        if not squared_error.any() or not noise_var.any():
            continue

        def nll(log_c: float) -> float:
            var = (spread_var + math.exp(2 * log_c) * noise_var).clip(min=1e-300)
            return float(np.mean(np.log(var) + squared_error / var))

        best = minimize_scalar(nll, bounds=(-math.log(bound), math.log(bound)), method="bounded",
                               options={"xatol": 1e-6})
        factors[quantity] = math.exp(best.x)
    return factors
