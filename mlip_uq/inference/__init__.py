"""Training methods; each returns a :class:`~mlip_uq.posterior.Posterior`."""
