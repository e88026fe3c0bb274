"""Selection rules: when to call the reference calculator.

Every rule reads one per-atom uncertainty signal (:mod:`mlip_uq.uq.signals`; the rule's ``signal`` option) and
the predicted forces (N, 3) eV/Å. The signals: ``total`` = ``atom_force_std`` (eV/Å), the calculator's key:
sqrt of the sum of the three force-component predictive variances of an atom; ``epistemic`` =
``atom_force_std_epistemic`` (eV/Å), the spread of the posterior's samples alone; ``bald`` = ½ log(1 + σ²_epi /
σ²_ale) (nats). The caller turns the posterior's stds into the rule's signal (:func:`rule_input`) and hands
the rule that array. A rule is used in two ways:

- during MD exploration, :meth:`check` is called at every uncertainty check (the MD driver's ``stop_rule``
  protocol, ``check(signal, forces) -> bool``); True = label this structure;
- on a candidate pool, :meth:`select` picks up to ``k`` candidates.

Rules (``rule.kind`` in a configuration), and the signal each reads:

``force_std`` — :class:`ThresholdRule`: fires when an atom's signal exceeds ``threshold`` (or, with
``relative``, ``threshold`` × (that atom's predicted force magnitude + ``eps``)); the test is
:class:`mlip_uq.md.ForceStdRule`'s, so MD and pool use one definition. Default signal ``epistemic`` (is the
structure unlike the training data?); ``signal: total`` for a threshold on the predictive std.

``top_k`` — :class:`TopKRule`: the ``k`` pool candidates with the largest max-over-atoms signal (pool only).
Default signal ``epistemic``.

``random`` — :class:`RandomRule`: the baseline. Fires at an MD step with probability ``probability``; on a pool
takes ``k`` candidates uniformly at random. Its random state is saved with the loop state. Its signal is only
logged (default ``epistemic``).

``interval`` — :class:`IntervalRule`: the other baseline, relabelling on a clock: fires at every ``every``-th MD
step of a walker (walker steps ``every``, 2 ``every``, ...; MD only), whatever the uncertainty. It is a pure
function of the walker's step count, so a resumed walker fires at the same steps. Its signal is only logged.

``calibrated`` — :class:`CalibratedRule`: fires when the probability that an atom's force error exceeds
``tolerance`` is above ``probability``; the uncertainty scale behind that probability is learned on the fly
from the residuals of the reference calls made so far (estimator in the class docstring). An error probability
needs the full predictive: its signal is always ``total``.
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import stats

from ..config import ConfigError
from ..md import ForceStdRule
from ..uq.signals import atom_signal, check_signal


def max_std(signal: np.ndarray) -> float:
    """The structure's uncertainty as logged and ranked: the largest per-atom signal (eV/Å for a std)."""
    return float(np.max(signal))


def rule_input(rule: "Rule", atom_force_std: np.ndarray, atom_force_std_epistemic: np.ndarray) -> np.ndarray:
    """The per-atom array ``rule`` reads: its :attr:`Rule.signal` of the predictive per-atom force std and its
    epistemic part (both (N,), eV/Å)."""
    return atom_signal(rule.signal, atom_force_std, atom_force_std_epistemic)


class Rule:
    """Base class: :meth:`check` for MD, :meth:`select` for pools, :meth:`score` to rank, state for resume."""

    #: the ``rule.kind`` name
    kind = ""
    #: the per-atom signal the rule reads (:mod:`mlip_uq.uq.signals`)
    signal = "epistemic"

    def check(self, atom_force_std: np.ndarray, forces: np.ndarray) -> bool:
        """True when the structure should be labelled (MD exploration)."""
        raise NotImplementedError(f"rule {self.kind!r} works on a candidate pool only, not during MD")

    def score(self, atom_force_std: np.ndarray, forces: np.ndarray) -> float:
        """How much the structure is wanted (larger first); default its largest per-atom force std."""
        return max_std(atom_force_std)

    def select(self, atom_force_std: Sequence[np.ndarray], forces: Sequence[np.ndarray], k: int) -> List[int]:
        """Up to ``k`` candidates (indices into the sequences), most wanted first, among those :meth:`check`
        accepts."""
        firing = [i for i, (a, f) in enumerate(zip(atom_force_std, forces)) if self.check(a, f)]
        return sorted(firing, key=lambda i: -self.score(atom_force_std[i], forces[i]))[:k]

    def due(self, walker_step: int) -> bool:
        """Whether the MD walker may call at its step ``walker_step`` (steps counted along the walker); every
        step but for a clock rule."""
        return True

    def observe(self, forces_pred: np.ndarray, forces_true: np.ndarray, atom_force_std: np.ndarray) -> None:
        """Learn from a reference call: predicted and reference forces (N, 3) eV/Å and the prediction's
        predictive per-atom force std (N,) eV/Å (``total``, whatever the rule's signal). Default: nothing."""

    def values(self, atom_force_std: np.ndarray, forces: np.ndarray) -> Dict[str, float]:
        """Numbers for the decision log: ``uncertainty`` = the largest per-atom signal, ``signal`` its name, and
        what the rule compares (e.g. ``probability``)."""
        return {"uncertainty": max_std(atom_force_std), "signal": self.signal}

    def describe(self) -> str:
        """The rule in words (the MD driver quotes it when the rule fires)."""
        return self.kind

    def state_dict(self) -> Dict:
        """JSON-serialisable state (saved with the loop state)."""
        return {}

    def load_state_dict(self, state: Dict) -> None:
        """Restore :meth:`state_dict`."""


class ThresholdRule(Rule):
    """Fires when a per-atom force std exceeds a threshold: :class:`mlip_uq.md.ForceStdRule`'s test.

    Args:
        threshold: in the signal's unit (eV/Å; nats for ``bald``), or dimensionless with ``relative``.
        relative: compare max_i std_i / (|F_i| + eps) instead of max_i std_i.
        consecutive: during MD, fire only after this many consecutive steps above the threshold (counted by
            the MD driver; a pool candidate is judged on its own).
        eps: force floor of the relative test (eV/Å).
        signal: ``epistemic`` (default), ``total`` or ``bald``.
    """

    kind = "force_std"

    def __init__(self, threshold: float, relative: bool = False, consecutive: int = 1, eps: float = 0.1,
                 signal: str = "epistemic"):
        self.md_rule = ForceStdRule(float(threshold), relative=bool(relative), consecutive=consecutive, eps=eps,
                                    signal=signal)
        self.consecutive = self.md_rule.consecutive
        self.signal = signal

    def check(self, atom_force_std: np.ndarray, forces: np.ndarray) -> bool:
        return self.md_rule.check(atom_force_std, forces)

    def score(self, atom_force_std: np.ndarray, forces: np.ndarray) -> float:
        return self.md_rule.measure(atom_force_std, forces)

    def describe(self) -> str:
        return self.md_rule.describe()


class TopKRule(Rule):
    """The ``k`` candidates with the largest max-over-atoms signal (pool only).

    Args:
        signal: ``epistemic`` (default), ``total`` or ``bald``.
    """

    kind = "top_k"

    def __init__(self, signal: str = "epistemic"):
        self.signal = check_signal(signal)

    def select(self, atom_force_std, forces, k: int) -> List[int]:
        order = np.argsort([-max_std(a) for a in atom_force_std], kind="stable")
        return [int(i) for i in order[:k]]


class RandomRule(Rule):
    """Uncertainty-blind baseline.

    Args:
        probability: chance of labelling the structure at each MD step (MD only).
        seed: seed of the generator (its state is part of :meth:`state_dict`).
    """

    kind = "random"

    def describe(self) -> str:
        return f"random, probability {self.probability:g} per step" if self.probability else "random"

    def __init__(self, probability: Optional[float] = None, seed: int = 0, signal: str = "epistemic"):
        if probability is not None and not 0 < probability <= 1:
            raise ValueError(f"rule.probability must be in (0, 1], got {probability}")
        self.signal = check_signal(signal)
        self.probability = probability
        self.rng = np.random.default_rng(seed)

    def check(self, atom_force_std, forces) -> bool:
        if self.probability is None:
            raise ValueError("rule random during MD needs rule.probability (the chance of a call per step)")
        return bool(self.rng.random() < self.probability)

    def select(self, atom_force_std, forces, k: int) -> List[int]:
        n = len(atom_force_std)
        return [int(i) for i in self.rng.choice(n, size=min(k, n), replace=False)]

    def state_dict(self) -> Dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: Dict) -> None:
        if state:
            self.rng.bit_generator.state = state["bit_generator"]


class IntervalRule(Rule):
    """Relabelling every ``every`` MD steps of a walker, the fixed-interval baseline (MD only).

    :meth:`check` is true at every uncertainty check and :meth:`due` only at walker steps that are positive
    multiples of ``every``, so the MD explorer calls at exactly those steps (``every`` must be a multiple of
    ``explore.uq_every`` and at least ``explore.min_gap``, checked by the explorer).

    Args:
        every: MD steps between two calls of a walker.
    """

    kind = "interval"

    def __init__(self, every: int, signal: str = "epistemic"):
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise ConfigError(f"rule.every={every!r}: expected a positive integer (MD steps)")
        self.every, self.signal = int(every), check_signal(signal)

    def check(self, atom_force_std, forces) -> bool:
        return True

    def due(self, walker_step: int) -> bool:
        return walker_step > 0 and walker_step % self.every == 0

    def describe(self) -> str:
        return f"every {self.every} MD steps"


class CalibratedRule(Rule):
    r"""Fires when the probability that some atom's force error exceeds a tolerance is high enough.

    Error model: atom i's force error ΔF_i (3-vector) is a centred Gaussian whose three component variances sum
    to (s · σ_i)², σ_i = ``atom_force_std`` of the atom, s a scale factor; taking the three components as
    equal (isotropic), |ΔF_i| / (s σ_i / √3) follows a χ distribution with 3 degrees of freedom, so

        P_i = P(|ΔF_i| > tolerance) = χ₃.sf(√3 · tolerance / (s σ_i)),

    and the structure fires when max_i P_i > ``probability``.

    Scale estimator (updated after every reference call): z_i² = |ΔF_i|² / σ_i² over the atoms of the
    labelled structures (prediction made before the call, error against the reference) has expectation s²
    under the model above — whatever the anisotropy — so

        s² = (n₀ s₀² + Σ_i z_i²) / (n₀ + n),

    the mean of the z_i² shrunk toward the prior s₀² with a weight of n₀ pseudo-atoms (n = atoms seen): the
    maximum-likelihood variance scale with a conjugate-style prior. Caveats: the residuals come from the
    structures the rule selected, i.e. from where the model is uncertain, and atoms of one structure are
    correlated, so the effective number of observations is smaller than n.

    The prior s₀ matters until the first calls: with s₀ = 1 and a posterior whose std is much smaller than its
    errors (common for short SG-MCMC chains) the rule may never fire, and so never learn. ``prior_scale:
    initial`` takes s₀ from the residuals of the initial training set under the first posterior
    (:meth:`set_prior`). These are in-sample: errors and stds are both smaller than away from the training data,
    so the ratio can be off either way (measured on TiO2: s₀ = 30, then 19 and 14 after the first two calls);
    with a prior weight of a few atoms the residuals of the reference calls take over after the first call.

    Args:
        tolerance: force-error tolerance per atom, |ΔF_i| (eV/Å).
        probability: firing level of max_i P_i, in (0, 1).
        prior_scale: s₀ (> 0), or ``"initial"`` (set by the loop after the first fit).
        prior_weight: n₀ in atoms (0 = no shrinkage).

    Its signal is ``total``: σ_i is the predictive std (an error probability needs the noise too).
    """

    kind = "calibrated"
    signal = "total"

    def __init__(self, tolerance: float, probability: float = 0.5, prior_scale="initial", prior_weight: float = 10.0):
        if tolerance <= 0:
            raise ValueError(f"rule.tolerance must be positive (eV/Å), got {tolerance}")
        if not 0 < probability < 1:
            raise ValueError(f"rule.probability must be in (0, 1), got {probability}")
        if prior_weight < 0 or not (prior_scale == "initial" or float(prior_scale) > 0):
            raise ValueError("rule.prior_scale must be positive or 'initial', rule.prior_weight non-negative")
        self.tolerance, self.probability = float(tolerance), float(probability)
        self.prior_scale = None if prior_scale == "initial" else float(prior_scale)
        self.prior_weight = float(prior_weight)
        self.sum_z2 = 0.0
        self.n_atoms = 0

    @property
    def needs_prior(self) -> bool:
        """True until s₀ is known (``prior_scale: initial`` before the first fit)."""
        return self.prior_scale is None

    @staticmethod
    def _z2(forces_pred, forces_true, atom_force_std) -> np.ndarray:
        sigma = np.asarray(atom_force_std, dtype=np.float64)
        error2 = np.sum((np.asarray(forces_pred, dtype=np.float64) - np.asarray(forces_true)) ** 2, axis=-1)
        usable = sigma > 0  # an atom with zero predicted std says nothing about the scale
        return error2[usable] / sigma[usable] ** 2

    def set_prior(self, forces_pred, forces_true, atom_force_std) -> None:
        """s₀ = sqrt(mean z_i²) over the given atoms (e.g. the initial training set); 1 when none is usable."""
        z2 = self._z2(forces_pred, forces_true, atom_force_std)
        self.prior_scale = float(np.sqrt(np.mean(z2))) if z2.size else 1.0

    @property
    def scale(self) -> float:
        """The current scale factor s of the predicted std (dimensionless)."""
        prior = 1.0 if self.prior_scale is None else self.prior_scale
        n0 = self.prior_weight
        if n0 + self.n_atoms == 0:
            return prior
        return math.sqrt((n0 * prior**2 + self.sum_z2) / (n0 + self.n_atoms))

    def exceed_probability(self, atom_force_std: np.ndarray) -> np.ndarray:
        """(N,) P(|ΔF_i| > tolerance) per atom under the scaled Gaussian (0 where σ_i is 0)."""
        sigma = self.scale * np.asarray(atom_force_std, dtype=np.float64)
        with np.errstate(divide="ignore"):
            x = np.where(sigma > 0, math.sqrt(3.0) * self.tolerance / sigma, np.inf)
        return stats.chi(3).sf(x)

    def check(self, atom_force_std, forces) -> bool:
        return self.score(atom_force_std, forces) > self.probability

    def score(self, atom_force_std, forces) -> float:
        return float(np.max(self.exceed_probability(atom_force_std)))

    def observe(self, forces_pred, forces_true, atom_force_std) -> None:
        z2 = self._z2(forces_pred, forces_true, atom_force_std)
        self.sum_z2 += float(np.sum(z2))
        self.n_atoms += int(z2.size)

    def values(self, atom_force_std, forces) -> Dict[str, float]:
        return {"uncertainty": max_std(atom_force_std), "signal": self.signal,
                "probability": self.score(atom_force_std, forces), "scale": self.scale}

    def describe(self) -> str:
        return (f"P(|force error| > {self.tolerance:g} eV/Å) > {self.probability:g} for some atom "
                f"(std scale {self.scale:.3g})")

    def state_dict(self) -> Dict:
        return {"sum_z2": self.sum_z2, "n_atoms": self.n_atoms, "prior_scale": self.prior_scale}

    def load_state_dict(self, state: Dict) -> None:
        if state:
            self.sum_z2, self.n_atoms = float(state["sum_z2"]), int(state["n_atoms"])
            self.prior_scale = state["prior_scale"]


RULES = {cls.kind: cls for cls in (ThresholdRule, TopKRule, RandomRule, IntervalRule, CalibratedRule)}


def rule_from_config(section: Dict, seed: int = 0) -> Rule:
    """A rule from a configuration section ``{kind: force_std | top_k | random | interval | calibrated, <options>}``.

    Raises:
        ConfigError: unknown kind, an unknown or missing option, or a number option that is not a number (the
            error names the option and its value).
    """
    options = dict(section)
    kind = options.pop("kind", None)
    if kind not in RULES:
        raise ConfigError(f"rule.kind {kind!r} unknown; choose from {sorted(RULES)}")
    if kind == "random":
        options.setdefault("seed", seed)
    cls = RULES[kind]
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = set(options) - set(params)
    if unknown:
        raise ConfigError(f"unknown rule option(s) {sorted(unknown)} for kind {kind}; known: {sorted(params)}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in options]
    if missing:
        raise ConfigError(f"rule kind {kind} needs rule.{missing[0]}")
    hints = typing.get_type_hints(cls.__init__)
    for name, value in options.items():
        number = hints.get(name) in (int, float)
        if number and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"rule.{name}={value!r}: expected a number")
    return cls(**options)
