"""Reusable tests: the contract every method's posterior must keep (as nequip ships its model test mixins).

A test class that subclasses :class:`PosteriorContract` and provides a ``contract_posterior`` fixture (a
:class:`~mlip_uq.posterior.Posterior`, e.g. loaded from a run's ``posterior.h5``) gets these tests, each run in
float32 and float64 (tolerances in :data:`TOLERANCES`):

- the predictive mean is the weighted mean of the samples (each sample predicted on its own);
- a posterior whose samples are all identical predicts zero epistemic std;
- the posterior file round trip keeps tensors, weights, method, hyperparameters, calibration and metadata;
- every property the ASE calculator advertises can be got from it, and is finite.

Example (in a test module)::

    class TestMyMethodPosterior(PosteriorContract):
        @pytest.fixture
        def contract_posterior(self, my_run):
            return load_posterior(my_run / "posterior.h5")

Needs ``pytest`` (a test dependency): import this module from tests only.
"""

from __future__ import annotations

from typing import Dict

import ase
import numpy as np
import pytest
import torch

from .data import atoms_to_graph, collate
from .posterior import Posterior, load_posterior
from .posterior.predict import predict_samples, predictive_moments

#: (rtol, atol relative to the largest |force|) of each dtype
TOLERANCES: Dict[str, tuple] = {"float64": (1e-10, 1e-12), "float32": (1e-4, 1e-5)}


def contract_atoms(type_names, seed: int = 0) -> ase.Atoms:
    """A small periodic test structure with two atoms of each element: a rattled simple-cubic grid (2 Å)."""
    symbols = [s for s in type_names for _ in range(2)]
    side = int(np.ceil(len(symbols) ** (1 / 3)))
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])[: len(symbols)]
    atoms = ase.Atoms(symbols, positions=2.0 * grid, cell=[2.0 * side + 1.0] * 3, pbc=True)
    atoms.rattle(stdev=0.1, seed=seed)
    return atoms


class PosteriorContract:
    """Mixin of the posterior contract; see the module docstring."""

    @pytest.fixture(params=["float64", "float32"])
    def dtype(self, request) -> str:
        return request.param

    @pytest.fixture
    def posterior(self, contract_posterior, dtype) -> Posterior:
        return contract_posterior.as_dtype(dtype)

    @pytest.fixture
    def batch(self, posterior):
        atoms = contract_atoms(posterior.config.type_names)
        graph = atoms_to_graph(atoms, posterior.config.type_names, posterior.config.r_max,
                               dtype=getattr(torch, posterior.config.dtype), with_labels=False)
        return collate([graph])

    def test_mean_is_the_weighted_mean_of_the_samples(self, posterior, batch, dtype):
        moments = predictive_moments(predict_samples(posterior, batch))
        alone = [predictive_moments(predict_samples(
            posterior.replace(samples={n: t[k : k + 1] for n, t in posterior.samples.items()}), batch))
            for k in range(posterior.n_samples)]
        w = posterior.weights.numpy()
        rtol, atol = TOLERANCES[dtype]
        scale = max(1.0, float(np.abs(moments.forces).max()))
        np.testing.assert_allclose(moments.forces, sum(wk * m.forces for wk, m in zip(w, alone)),
                                   rtol=rtol, atol=atol * scale)
        np.testing.assert_allclose(moments.energy, sum(wk * m.energy for wk, m in zip(w, alone)),
                                   rtol=rtol, atol=atol * max(1.0, float(np.abs(moments.energy).max())))

    def test_identical_samples_give_zero_epistemic_std(self, posterior, batch):
        k = max(2, posterior.n_samples)
        same = posterior.replace(samples={n: t[:1].expand(k, *t.shape[1:]).clone()
                                          for n, t in posterior.samples.items()})
        moments = predictive_moments(predict_samples(same, batch))
        assert np.all(moments.forces_std_epistemic == 0) and np.all(moments.energy_std_epistemic == 0)

    def test_file_round_trip(self, posterior, tmp_path):
        posterior.save(tmp_path / "posterior.h5")
        loaded = load_posterior(tmp_path / "posterior.h5")
        assert (loaded.method, loaded.n_samples, loaded.config) == (posterior.method, posterior.n_samples,
                                                                     posterior.config)
        assert loaded.hyperparameters == posterior.hyperparameters and loaded.calibration == posterior.calibration
        assert loaded.energy_references == posterior.energy_references
        assert loaded.data_fingerprint == posterior.data_fingerprint
        torch.testing.assert_close(loaded.weights, posterior.weights, rtol=0, atol=0)
        for group in ("shared", "samples"):
            mine, theirs = getattr(loaded, group), getattr(posterior, group)
            assert set(mine) == set(theirs)
            for name, t in theirs.items():
                torch.testing.assert_close(mine[name], t, rtol=0, atol=0)

    def test_every_calculator_property_can_be_got(self, posterior, dtype):
        from .calculator import UQCalculator

        atoms = contract_atoms(posterior.config.type_names)
        atoms.calc = UQCalculator(posterior, dtype=dtype)
        for name in atoms.calc.implemented_properties:
            value = atoms.calc.get_property(name, atoms)
            assert np.all(np.isfinite(value)), name
