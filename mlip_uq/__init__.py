"""mlip_uq: uncertainty-aware machine-learned interatomic potentials.

A NequIP model (built from ``nequip`` blocks) whose parameters are described by a
:class:`~mlip_uq.posterior.Posterior`: K parameter samples made by MAP training, SG-MCMC,
variational inference, deep ensembles or MC dropout.
"""

__version__ = "0.1.0"
