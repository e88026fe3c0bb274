"""Option parsing shared by the methods' ``Settings.from_dict``: the nested prior and ``stochastic`` options,
and the checks that span configuration sections (dropout)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from ..settings import FROM_MAP, ConfigError, check_type, section_mapping, settings_from


@dataclass
class PriorSettings:
    """The Gaussian prior of a sampling or variational method (``sgmcmc.prior``, ``vi.prior``).

    Args:
        scale: prior std of every stochastic parameter (parameter units).
        layer_scales: per-layer overrides of ``scale`` (layer names of :func:`~mlip_uq.inference.priors.layers`).
        center: a posterior file or checkpoint of a pre-trained model whose weights centre the prior (transfer
            learning); None: zero-centred.
        noise_scale: prior std of the observation-noise log-factors (a factor e per unit; see
            :class:`~mlip_uq.inference.priors.GaussianPrior`).
    """

    scale: float = 1.0
    layer_scales: Dict[str, float] = field(default_factory=dict)
    center: Optional[str] = None
    noise_scale: float = 1.0


def likelihood_options(values: Any, section: str) -> Dict[str, Any]:
    """A copy of a method section with ``prior`` parsed into a :class:`PriorSettings`, ``likelihood_weights``
    into a :class:`~mlip_uq.inference.loss.LossWeights` and the form of ``stochastic`` checked (``all``,
    ``{last_layers: N}`` or ``{patterns: [...]}``; which layers exist is checked against the model later).

    Raises:
        ConfigError: an unknown or mistyped option, named with its ``section`` (e.g. ``sgmcmc.prior.scale``);
            a ``noise`` option (the observation noise is part of the model).
    """
    values = dict(section_mapping(values, section))
    if "noise" in values:
        raise ConfigError(f"{section}.noise: the observation noise is part of the model: set model.noise "
                          "(learned, head or fixed) and model.force_noise / energy_noise / stress_noise")
    if "prior" in values:
        values["prior"] = settings_from(PriorSettings, values["prior"], f"{section}.prior")
    if isinstance(values.get("likelihood_weights"), dict):
        from .loss import LossWeights  # torch: imported here, so that reading a configuration stays light

        values["likelihood_weights"] = settings_from(LossWeights, values["likelihood_weights"],
                                                     f"{section}.likelihood_weights")
    if "stochastic" in values:
        check_stochastic(values["stochastic"], f"{section}.stochastic")
    return values


def check_stochastic(spec: Any, key: str) -> None:
    """Check the form of a ``stochastic`` option: ``all``, ``{last_layers: N}`` or ``{patterns: [...]}``.

    Example:
        >>> check_stochastic({"last_layers": 2}, "sgmcmc.stochastic")
        >>> check_stochastic({"last_layer": 2}, "sgmcmc.stochastic")
        Traceback (most recent call last):
        ...
        mlip_uq.settings.ConfigError: sgmcmc.stochastic={'last_layer': 2}: expected 'all', {last_layers: N} or {patterns: [...]}
    """
    if spec == "all":
        return
    if not isinstance(spec, dict) or len(spec) != 1 or not set(spec) <= {"last_layers", "patterns"}:
        raise ConfigError(f"{key}={spec!r}: expected 'all', {{last_layers: N}} or {{patterns: [...]}}")
    if "last_layers" in spec:
        check_type(spec["last_layers"], int, f"{key}.last_layers")
    else:
        check_type(spec["patterns"], list, f"{key}.patterns")


def check_no_dropout(model: Dict, method: str) -> None:
    """Sampling and variational methods have no dropout masks.

    Raises:
        ConfigError: ``model.dropout`` > 0.
    """
    if float(model.get("dropout", 0.0)) > 0:
        raise ConfigError(f"model.dropout is for methods dropout, map and ensemble, not {method}")


def map_options(config: Mapping[str, Any], section: str) -> Tuple[str, ...]:
    """The options ``<section>.init`` and ``<section>.prior.center`` of a run configuration that ask for the MAP
    model the run trains first (:data:`~mlip_uq.config.FROM_MAP`), as dotted keys.

    Example:
        >>> map_options({"vi": {"init": "map", "prior": {"center": "map"}}}, "vi")
        ('vi.init', 'vi.prior.center')
    """
    values = section_mapping(config.get(section), section)
    prior = values.get("prior") if isinstance(values.get("prior"), dict) else {}
    return tuple(key for key, value in ((f"{section}.init", values.get("init")),
                                        (f"{section}.prior.center", prior.get("center"))) if value == FROM_MAP)
