"""mlip_uq: uncertainty-aware machine-learned interatomic potentials.

A NequIP model (built from ``nequip`` blocks) whose parameters are described by a
:class:`~mlip_uq.posterior.Posterior`: K parameter samples made by MAP training, SG-MCMC,
variational inference, deep ensembles or MC dropout.
"""

__version__ = "0.1.0"

__all__ = ["UQCalculator", "uq_to_atoms", "__version__"]


def __getattr__(name):
    # imported on first use, so that `import mlip_uq` (and the command line) stays light
    if name in ("UQCalculator", "uq_to_atoms"):
        from . import calculator

        return getattr(calculator, name)
    raise AttributeError(f"module 'mlip_uq' has no attribute {name!r}")
