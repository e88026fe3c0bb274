"""Active learning: uncertainty-triggered relabelling with a reference calculator.

:mod:`~mlip_uq.active.oracle` (reference calculators), :mod:`~mlip_uq.active.rules` (when to call them),
:mod:`~mlip_uq.active.explore` (MD walkers, candidate pools), :mod:`~mlip_uq.active.update` (warm-start
posterior updates), :mod:`~mlip_uq.active.loop` (the loop, ``mlip-uq active``).
"""

from .config import ActiveConfig
from .loop import ActiveLoop, load_active_config, run_active, summarize
from .oracle import Oracle, OracleResult, oracle_from_config
from .rules import CalibratedRule, RandomRule, ThresholdRule, TopKRule, rule_from_config

__all__ = [
    "ActiveConfig",
    "ActiveLoop",
    "CalibratedRule",
    "Oracle",
    "OracleResult",
    "RandomRule",
    "ThresholdRule",
    "TopKRule",
    "load_active_config",
    "oracle_from_config",
    "rule_from_config",
    "run_active",
    "summarize",
]
