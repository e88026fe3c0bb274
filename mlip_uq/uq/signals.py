"""Which per-atom uncertainty a decision reads: the uncertainty signals of the stop rule, the active-learning
rules and the out-of-distribution scores, defined once.

A predictive force std is epistemic (the spread of the posterior's samples) plus aleatoric (the observation
noise): σ² = σ²_epi + σ²_ale per atom, summed over its three components (``atom_force_std``). A decision that asks
*is this structure unlike the training data?* (a ranking or threshold of active learning, an OOD score, a
committee deviation as DeePMD writes it) should read the epistemic part, since the noise does not shrink with
more data; a decision that asks *how large is the error likely to be?* (an error probability, an NLL, an MD
safety stop) reads the full predictive. Signals (``signal`` in a rule's options):

==================  ===================================================================  ============
``total``           σ_i = ``atom_force_std``: the full predictive std of atom i            eV/Å
``epistemic``       σ_epi,i = ``atom_force_std_epistemic``: the spread of the samples      eV/Å
``bald``            ½ log(1 + σ²_epi,i / σ²_ale,i): the mutual information between a       nats
                    label and the parameters for a Gaussian predictive (BALD, Houlsby
                    et al. 2011), per atom from its summed variances; it asks the
                    epistemic question relative to the noise, so raising the noise
                    lowers it
==================  ===================================================================  ============

The epistemic std is independent of the observation noise (raising only the noise leaves every decision on
``epistemic`` unchanged); a posterior of one model has ``epistemic`` = 0 everywhere, so it cannot rank by it.
"""

from __future__ import annotations

from typing import Mapping, Tuple

import numpy as np

from ..result_keys import ATOM_FORCE_STD, ATOM_FORCE_STD_EPISTEMIC

#: the signal names and their units
SIGNALS = {"total": "eV/Å", "epistemic": "eV/Å", "bald": "nats"}


def check_signal(signal: str, allowed: Tuple[str, ...] = tuple(SIGNALS)) -> str:
    """``signal`` if it is one of ``allowed``, else a ValueError naming the choices."""
    if signal not in allowed:
        raise ValueError(f"uncertainty signal {signal!r} unknown here; choose from {list(allowed)}")
    return signal


def atom_signal(signal: str, atom_force_std: np.ndarray, atom_force_std_epistemic: np.ndarray) -> np.ndarray:
    """The per-atom signal (module docstring) from the predictive per-atom force std and its epistemic part.

    Args:
        signal: ``total``, ``epistemic`` or ``bald``.
        atom_force_std: (N,) predictive per-atom force std (eV/Å).
        atom_force_std_epistemic: (N,) its epistemic part (eV/Å), at most ``atom_force_std``.

    Returns:
        (N,) float64, in the signal's unit (:data:`SIGNALS`).

    Example:
        >>> atom_signal("bald", np.array([0.5]), np.array([0.3]))  # σ²_ale = 0.16: ½ log(1 + 0.09 / 0.16)
        array([0.22314355])
    """
    check_signal(signal)
    total = np.asarray(atom_force_std, dtype=np.float64)
    if signal == "total":
        return total
    epistemic = np.asarray(atom_force_std_epistemic, dtype=np.float64)
    if signal == "epistemic":
        return epistemic
    aleatoric = np.maximum(total**2 - epistemic**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(aleatoric > 0, epistemic**2 / aleatoric, np.where(epistemic > 0, np.inf, 0.0))
    return 0.5 * np.log1p(ratio)


def signal_from_results(results: Mapping, signal: str) -> np.ndarray:
    """:func:`atom_signal` of a calculator's results (``atom_force_std`` and, unless ``signal`` is ``total``,
    ``atom_force_std_epistemic``, as :class:`~mlip_uq.calculator.UQCalculator` writes them)."""
    total = results[ATOM_FORCE_STD]
    return atom_signal(signal, total, total if signal == "total" else results[ATOM_FORCE_STD_EPISTEMIC])
