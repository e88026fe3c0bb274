"""Uncertainty signals (total, epistemic, BALD-like) and the rules that read them: a rule on the epistemic
signal takes the same decisions when only the observation noise is raised."""

import numpy as np
import pytest
import torch
from ase.build import molecule
from conftest import seeded_posterior, tiny_model_config

from mlip_uq import UQCalculator
from mlip_uq.active.explore import pool_uncertainty
from mlip_uq.active.rules import CalibratedRule, ThresholdRule, TopKRule, rule_from_config, rule_input
from mlip_uq.config import ConfigError
from mlip_uq.data import atoms_to_graph
from mlip_uq.md import ForceStdRule, run_md
from mlip_uq.uq.signals import atom_signal, signal_from_results

FORCE_NOISE = "model.func.observation_noise.force_log_factor"


def test_signals_follow_their_definitions():
    total, epistemic = np.array([0.5, 0.2, 0.3]), np.array([0.3, 0.0, 0.3])
    np.testing.assert_array_equal(atom_signal("total", total, epistemic), total)
    np.testing.assert_array_equal(atom_signal("epistemic", total, epistemic), epistemic)
    bald = atom_signal("bald", total, epistemic)
    assert bald[0] == pytest.approx(0.5 * np.log(1 + 0.09 / 0.16)) and bald[1] == 0.0 and bald[2] == np.inf
    # more noise, same spread: the epistemic signal is unchanged, BALD falls, the total grows
    noisier = np.sqrt(total**2 + 1.0)
    np.testing.assert_array_equal(atom_signal("epistemic", noisier, epistemic), epistemic)
    assert atom_signal("bald", noisier, epistemic)[0] < bald[0]
    with pytest.raises(ValueError, match="'aleatoric' unknown"):
        atom_signal("aleatoric", total, epistemic)
    results = {"atom_force_std": total, "atom_force_std_epistemic": epistemic}
    np.testing.assert_array_equal(signal_from_results(results, "epistemic"), epistemic)


def test_rules_read_their_signal_and_calibrated_reads_the_total():
    assert ThresholdRule(0.1).signal == TopKRule().signal == "epistemic"
    assert rule_from_config({"kind": "top_k", "signal": "bald"}).signal == "bald"
    assert CalibratedRule(0.5).signal == "total"
    with pytest.raises(ConfigError, match="unknown rule option.*signal"):
        rule_from_config({"kind": "calibrated", "tolerance": 0.5, "signal": "epistemic"})
    with pytest.raises(ValueError, match="unknown here"):
        rule_from_config({"kind": "top_k", "signal": "noise"})
    with pytest.raises(ValueError, match="bald is no std"):
        ForceStdRule(0.1, relative=True, signal="bald")
    assert "atom_force_std_epistemic" in ForceStdRule(0.1, signal="epistemic").describe()


def _pool():
    structures = [molecule(name) for name in ("CH3CH2OH", "H2O", "CH4", "CH3OH", "HCOOH", "CH3CHO")]
    for i, atoms in enumerate(structures):
        atoms.rattle(0.05, seed=i)
    return structures


def _noisier(posterior, factor: float):
    """The same posterior with every sample's force noise std times ``factor`` (nothing else changed)."""
    samples = dict(posterior.samples)
    samples[FORCE_NOISE] = samples[FORCE_NOISE] + float(np.log(factor))
    return posterior.replace(samples=samples, weights=posterior.weights)


def test_a_rule_on_the_epistemic_signal_ignores_the_observation_noise():
    posterior = seeded_posterior(tiny_model_config(["H", "C", "O"], dtype="float64"), seeds=(0, 1, 2, 3),
                                 method="ensemble")
    graphs = [atoms_to_graph(a, posterior.config.type_names, posterior.config.r_max) for a in _pool()]
    forces, stds, epistemic = pool_uncertainty(posterior, graphs)
    _, stds_noisy, epistemic_noisy = pool_uncertainty(_noisier(posterior, 3.0), graphs)
    for a, b in zip(epistemic, epistemic_noisy):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert all((b > a).all() for a, b in zip(stds, stds_noisy))

    def decisions(rule, totals, epistemics):
        inputs = [rule_input(rule, s, e) for s, e in zip(totals, epistemics)]
        checks = [rule.check(x, f) for x, f in zip(inputs, forces)] if rule.kind != "top_k" else []
        return rule.select(inputs, forces, k=3), checks

    threshold = float(np.median([e.max() for e in epistemic]))
    for rule in (TopKRule(), ThresholdRule(threshold)):
        assert decisions(rule, stds, epistemic) == decisions(rule, stds_noisy, epistemic_noisy)
    # a threshold on the total std at the largest of the pool fires nowhere, and somewhere once the noise is
    # tripled
    total_rule = ThresholdRule(float(max(s.max() for s in stds)), signal="total")
    assert not any(decisions(total_rule, stds, epistemic)[1]) and any(decisions(total_rule, stds_noisy,
                                                                                  epistemic_noisy)[1])


def test_the_md_stop_rule_reads_the_signal_it_names():
    posterior = seeded_posterior(tiny_model_config(["H", "C", "O"], dtype="float64"), seeds=(0, 1, 2),
                                 method="ensemble")
    atoms = molecule("CH3CH2OH")
    calc = UQCalculator(posterior)
    atoms.calc = calc
    epistemic = float(np.max(calc.get_property("atom_force_std_epistemic", atoms)))
    total = float(np.max(calc.get_property("atom_force_std", atoms)))
    assert epistemic < total
    # a threshold between the two: the total-signal rule stops at the first check (step 0), the epistemic one
    # goes past it
    between = 0.5 * (epistemic + total)
    stopped = run_md(atoms.copy(), UQCalculator(posterior), steps=3, temperature_K=0.0, ensemble="nve",
                     stop_rule=ForceStdRule(between, signal="total"), progress=False)
    assert stopped.stopped and stopped.steps_done == 0
    free = run_md(atoms.copy(), UQCalculator(posterior), steps=3, temperature_K=0.0, ensemble="nve",
                  stop_rule=ForceStdRule(between, signal="epistemic"), progress=False)
    assert free.steps_done > 0


def test_epistemic_is_zero_for_one_model():
    posterior = seeded_posterior(tiny_model_config(["H", "C", "O"], dtype="float64"), seeds=(0,))
    graphs = [atoms_to_graph(molecule("H2O"), posterior.config.type_names, posterior.config.r_max)]
    _, stds, epistemic = pool_uncertainty(posterior, graphs)
    assert (stds[0] > 0).all() and np.array_equal(epistemic[0], np.zeros_like(epistemic[0]))
    assert torch.is_tensor(posterior.weights)
