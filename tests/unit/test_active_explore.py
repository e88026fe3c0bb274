"""Explorers: pool predictions equal the calculator's, walkers restart reproducibly, round robin; explorers
driven by a hand-made context (no loop), and their state round-trips through state_dict."""

import contextlib
import json

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import seeded_posterior, tiny_model_config

from mlip_uq import UQCalculator
from mlip_uq.active.explore import (
    ExploreContext,
    MDExplorer,
    MDOptions,
    PoolExplorer,
    PoolOptions,
    Walker,
    next_walker,
    pool_uncertainty,
)
from mlip_uq.active.oracle import FAILED, LABELLED, OracleResult
from mlip_uq.active.rules import rule_from_config
from mlip_uq.active.state import LoopState, bare_atoms
from mlip_uq.data import atoms_to_graph
from mlip_uq.files import write_json


@pytest.fixture(scope="module")
def posterior():
    # float64: the pool's batched predictions are compared with the calculator's at 1e-10
    return seeded_posterior(tiny_model_config(["H", "C", "O"], dtype="float64"), method="ensemble")


def test_pool_uncertainty_matches_the_calculator_in_batches(posterior):
    structures = [molecule(name) for name in ("CH3CH2OH", "H2O", "CH4", "CH3OH", "HCOOH")]
    for i, atoms in enumerate(structures):
        atoms.rattle(0.05, seed=i)
    graphs = [atoms_to_graph(a, posterior.config.type_names, posterior.config.r_max) for a in structures]
    forces, stds, epistemic = pool_uncertainty(posterior, graphs, batch_size=2)
    assert [len(f) for f in forces] == [len(a) for a in structures]
    calc = UQCalculator(posterior)
    for atoms, f, s, e in zip(structures, forces, stds, epistemic):
        atoms.calc = calc
        np.testing.assert_allclose(f, atoms.get_forces(), atol=1e-10)
        np.testing.assert_allclose(s, calc.get_property("atom_force_std", atoms), atol=1e-10)
        np.testing.assert_allclose(e, calc.get_property("atom_force_std_epistemic", atoms), atol=1e-10)
        assert (s > 0).all() and (e < s).all()
    # a recalibrated posterior scales both alike
    scaled = posterior.with_calibration({"forces": 2.0})
    _, stds2, epistemic2 = pool_uncertainty(scaled, graphs[:1])
    np.testing.assert_allclose(stds2[0], 2.0 * stds[0], rtol=1e-12)
    np.testing.assert_allclose(epistemic2[0], 2.0 * epistemic[0], rtol=1e-12)


def test_walker_restarts_are_reproducible_and_at_temperature():
    atoms = molecule("CH3CH2OH")
    first = Walker.new(0, atoms, temperature_K=500.0, seed=3)
    again = Walker.new(0, atoms, temperature_K=500.0, seed=3)
    assert first.atoms == again.atoms and first.current().get_momenta().any()
    assert np.allclose(first.current().get_momenta().sum(axis=0), 0.0)  # no centre-of-mass drift
    momenta = first.current().get_momenta()
    first.restarts += 1
    first.reset(500.0, seed=3)
    assert not np.allclose(first.current().get_momenta(), momenta)  # a restart draws new velocities
    np.testing.assert_array_equal(first.current().positions, atoms.positions)
    assert first.chunk_seed(3) == again.chunk_seed(3)
    again.chunks += 1
    assert first.chunk_seed(3) != again.chunk_seed(3)


def test_next_walker_goes_round_robin_and_skips_finished_ones():
    atoms = molecule("H2O")
    walkers = [Walker.new(i, atoms, 300.0, 0) for i in range(3)]
    assert next_walker(walkers, -1).index == 0 and next_walker(walkers, 0).index == 1
    assert next_walker(walkers, 2).index == 0
    walkers[0].done = walkers[1].done = True
    assert next_walker(walkers, 2).index == 2
    walkers[2].done = True
    assert next_walker(walkers, 0) is None


class FakeLoop:
    """The loop's side of an :class:`ExploreContext`, by hand: a fixed posterior, scripted reference outcomes
    (labels: zero energy and forces), and commits and saves kept in lists, each with the explorer's state then."""

    def __init__(self, posterior, explorer, outcomes=()):
        self.posterior, self.explorer, self.outcomes = posterior, explorer, list(outcomes)
        self.called, self.commits, self.saves = [], [], []

    def call(self, atoms):
        self.called.append(atoms)
        if (self.outcomes.pop(0) if self.outcomes else LABELLED) == FAILED:
            return OracleResult(FAILED, 0.1, message="SCF did not converge")
        labelled = bare_atoms(atoms)
        labelled.calc = SinglePointCalculator(labelled, energy=0.0, forces=np.zeros((len(atoms), 3)))
        return OracleResult(LABELLED, 0.1, atoms=labelled)

    def commit(self, source, result, **values):
        self.commits.append((source, result.outcome, values, self.explorer.state_dict()))

    def context(self, rule, calls_left=None) -> ExploreContext:
        return ExploreContext(rule=rule, posterior=lambda: self.posterior,
                              calculator=lambda: UQCalculator(self.posterior), call=self.call, commit=self.commit,
                              save=lambda: self.saves.append(self.explorer.state_dict()),
                              timed=contextlib.nullcontext, calls_left=calls_left)


def _md_explorer(tmp_path):
    tmp_path.mkdir(exist_ok=True)  # the loop's output folder
    starts = [molecule("CH3CH2OH"), molecule("CH3OH")]
    options = MDOptions(steps=20, chunk_steps=10, min_gap=5, temperature_K=[300.0, 600.0])
    return MDExplorer(options, starts, seed=0, out=tmp_path)


def test_md_explorer_steps_with_a_hand_made_context_and_resumes_from_its_state_dict(posterior, tmp_path):
    explorer, rule = _md_explorer(tmp_path), rule_from_config({"kind": "interval", "every": 5})
    explorer.check_rule(rule)
    fresh = explorer.state_dict()
    assert json.loads(json.dumps(fresh)) == fresh  # JSON as it is
    assert fresh["current_walker"] == -1 and fresh["md_steps"] == 0 and len(fresh["walkers"]) == 2
    fake = FakeLoop(posterior, explorer, outcomes=[LABELLED, FAILED])
    explorer.step(fake.context(rule))  # walker 0: the clock fires at its step 5, labelled
    after_first = explorer.state_dict()
    explorer.step(fake.context(rule))  # walker 1 (round robin): step 5, the reference fails
    (source0, outcome0, values0, state0), (source1, outcome1, values1, state1) = fake.commits
    assert (source0, outcome0, values0["step"], values0["md_steps"]) == ("md walker 0", LABELLED, 5, 5)
    assert (source1, outcome1, values1["step"], values1["md_steps"]) == ("md walker 1", FAILED, 5, 10)
    assert values0["rule"] == "interval" and state0 == after_first  # committed with the state after the decision
    walker0, walker1 = state1["walkers"]
    assert walker0["steps_done"] == walker0["last_call"] == 5 and walker0["restarts"] == 0
    assert walker1["restarts"] == 1 and walker1["atoms"]["positions"] == walker1["start"]["positions"]
    assert state1["current_walker"] == 1 and explorer.stop_reason() is None
    with open(tmp_path / "md" / "walker0.csv") as handle:
        assert len(handle.read().splitlines()) == 1 + 5  # header and walker steps 1..5
    # a second explorer loaded from the state after the first decision takes the same second decision
    again = _md_explorer(tmp_path / "again")
    again.load_state_dict(after_first)
    assert again.state_dict() == after_first
    replay = FakeLoop(posterior, again, outcomes=[FAILED])
    again.step(replay.context(rule))
    assert replay.commits == fake.commits[1:]
    np.testing.assert_array_equal(replay.called[0].positions, fake.called[1].positions)


def test_pool_explorer_steps_with_a_hand_made_context_and_resumes_from_its_state_dict(posterior, tmp_path):
    frames = [molecule(name) for name in ("CH3CH2OH", "H2O", "CH4", "CH3OH", "HCOOH")]
    for i, atoms in enumerate(frames):
        atoms.rattle(0.05, seed=i)
    config = posterior.config

    def explorer(out):
        out.mkdir(exist_ok=True)
        return PoolExplorer(PoolOptions(batch=2, batch_size=2), frames, [10, 11, 12, 13, 14], out,
                            config.type_names, config.r_max, torch.float64)

    first, rule = explorer(tmp_path), rule_from_config({"kind": "top_k"})
    first.check_rule(rule)
    fake = FakeLoop(posterior, first)
    assert fake.context(rule).calls_left is None and first.step(fake.context(rule)) is None
    # a batch of two selected (saved before any call), its most uncertain candidate labelled first
    assert fake.saves[0]["round"] == 1 and len(fake.saves[0]["batch"]) == 2 and fake.saves[0]["used"] == []
    source, outcome, values, state = fake.commits[0]
    assert outcome == LABELLED and values["step"] == 1 and first.batch_open()
    assert state == {"used": fake.saves[0]["batch"][:1], "batch": fake.saves[0]["batch"][1:], "round": 1}
    # resumed from that state: the batch's second candidate, no new selection
    second = explorer(tmp_path / "again")
    second.load_state_dict(state)
    assert second.state_dict() == state and second.batch_open()
    replay = FakeLoop(posterior, second)
    second.step(replay.context(rule))
    first.step(fake.context(rule))
    assert replay.saves == [] and replay.commits == fake.commits[1:]
    assert values["uncertainty"] >= replay.commits[0][2]["uncertainty"]
    # the budget caps the next batch; a rule that fires on no candidate ends the exploration
    first.step(fake.context(rule, calls_left=1))
    assert fake.saves[-1]["round"] == 2 and len(fake.saves[-1]["batch"]) == 1  # one call left: a batch of one
    assert not first.batch_open() and len(first.used) == 3
    never = rule_from_config({"kind": "force_std", "threshold": 1e9})
    assert first.step(fake.context(never)) == "no pool candidate fires the rule"
    first.step(fake.context(rule))
    first.step(fake.context(rule))
    assert first.stop_reason() == "pool exhausted" and not first.batch_open()
    assert sorted(c[0] for c in fake.commits) == [f"pool[{i}]" for i in range(10, 15)]


def test_a_state_file_of_version_1_moves_the_explorer_fields_into_its_entry(tmp_path):
    """state.json before explorers kept their own state: walkers, current_walker, md_steps and pool at the top
    level; read, they become the ``explorer`` entry of the matching explorer, so that an old run resumes."""
    md = _md_explorer(tmp_path).state_dict()
    md["md_steps"], md["current_walker"] = 37, 1
    pool = {"used": [3, 0], "batch": [4], "round": 2}
    for explorer, old in ((md, {**md, "pool": {"used": [], "batch": [], "round": 0}}),
                          (pool, {"walkers": [], "current_walker": -1, "md_steps": 0, "pool": pool})):
        values = {k: v for k, v in LoopState().to_dict().items() if k != "explorer"}
        write_json({**values, "version": 1, **old}, tmp_path / "state.json")
        state = LoopState.read(tmp_path / "state.json")
        assert state.explorer == explorer and state.version == 2
        assert state.md_steps == (37 if explorer is md else 0)
        assert LoopState(**state.to_dict()) == state  # written again in the new layout
