"""The active-learning loop end to end with tblite's GFN2-xTB as the reference: labels, updates, kill-and-resume
without loss or duplicates, failure injection (exception, NaN, rejected element), the command line."""

import csv
import json

import ase.io
import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.calculators.calculator import Calculator, all_changes
from conftest import BUNDLED_ETHANOL_TEST, BUNDLED_ETHANOL_TRAIN, TINY_MODEL
from tblite.ase import TBLite

from mlip_uq.active import Oracle, oracle_from_config, run_active
from mlip_uq.active import explore as explore_module
from mlip_uq.active import state as state_module
from mlip_uq.active import update as update_module
from mlip_uq.cli import main
from mlip_uq.data import FrameStore
from mlip_uq.inference import sgmcmc as sgmcmc_module
from mlip_uq.posterior import load_posterior

N_INITIAL, BUDGET = 6, 3


def tiny_config(**sections):
    """Ethanol from rMD17 (the structures shipped in data/) relabelled by GFN2-xTB, MD exploration at 500 K, a
    very small SG-MCMC model."""
    cfg = {
        "name": "tiny_active",
        "seed": 0,
        "oracle": {"calculator": "tblite", "method": "GFN2-xTB"},
        "initial": {"path": str(BUNDLED_ETHANOL_TRAIN), "n": N_INITIAL},
        "test": {"path": str(BUNDLED_ETHANOL_TEST), "n": 4},
        "explore": {"kind": "md", "steps": 60, "chunk_steps": 20, "temperature_K": 500, "timestep_fs": 0.5},
        "rule": {"kind": "force_std", "threshold": 0.05},
        "budget": {"max_calls": BUDGET},
        "update": {"settle_steps": 4, "n_samples": 2},
        "train": {
            "method": "sgmcmc",
            "model": dict(TINY_MODEL),
            "sgmcmc": {"lr": 1e-3, "batch_size": 3, "burnin_steps": 20, "preheat_steps": 2, "n_samples": 2,
                       "thinning": 3, "checkpoint_every": 5},
        },
    }
    cfg.update(sections)
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("active")
    run_active(tiny_config(), out)
    return out


def _decisions(out):
    return [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]


def _assert_no_loss_no_duplicate(out):
    """Every labelled decision has its own store frame, in order, and no structure is stored twice."""
    decisions = _decisions(out)
    assert [d["decision"] for d in decisions] == list(range(len(decisions)))
    labelled = [d for d in decisions if d["outcome"] == "labelled"]
    store = FrameStore.open(out / "labelled.h5")
    assert [d["store_index"] for d in labelled] == list(range(len(store)))
    positions = [a.positions.round(8).tobytes() for a in store.atoms()]
    assert len(set(positions)) == len(positions)
    state = json.loads((out / "state.json").read_text())
    assert state["n_labelled"] == len(store) and state["pending"] is None
    for walker in state["explorer"].get("walkers", []):  # the MD trace: every step of every walker once
        with open(out / "md" / f"walker{walker['index']}.csv") as handle:
            steps = [int(row["step"]) for row in csv.DictReader(handle)]
        assert steps == list(range(1, walker["steps_done"] + 1))
    return decisions, store


def test_loop_labels_with_the_oracle_and_updates_the_posterior(reference):
    decisions, store = _assert_no_loss_no_duplicate(reference)
    assert len(store) == N_INITIAL + BUDGET
    assert [d["phase"] for d in decisions] == ["initial"] * N_INITIAL + ["explore"] * BUDGET
    explore = decisions[N_INITIAL:]
    assert all(d["outcome"] == "labelled" and d["rule"] == "force_std" and d["uncertainty"] > 0.05
               and d["call_s"] > 0 and d["source"] == "md walker 0" for d in explore)
    assert [d["md_steps"] for d in explore] == sorted(d["md_steps"] for d in explore)
    steps = [d["step"] for d in explore]
    assert all(b - a >= 10 for a, b in zip(steps, steps[1:]))  # explore.min_gap (default 10 MD steps)
    # the stored labels are the oracle's (GFN2-xTB), not the file's (DFT)
    oracle = oracle_from_config({"calculator": "tblite", "method": "GFN2-xTB"})
    for atoms in store.atoms([0, N_INITIAL]):
        again = oracle.label(atoms).atoms
        assert atoms.get_potential_energy() == pytest.approx(again.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(atoms.get_forces(), again.get_forces(), atol=1e-8)
    # one fit, then one warm-started update per labelled structure, each evaluated on the test set
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["updates"] == 1 + BUDGET and len(summary["history"]) == 1 + BUDGET
    assert [h["n_train"] for h in summary["history"]] == [N_INITIAL + k for k in range(BUDGET + 1)]
    assert all(np.isfinite(h["forces_mae"]) for h in summary["history"])
    rounds = json.loads((reference / "model" / "sgmcmc" / "rounds.json").read_text())
    assert rounds["round"] == BUDGET and rounds["num_data"] == N_INITIAL + BUDGET
    posterior = load_posterior(reference / summary["posterior"])
    assert posterior.method == "sgmcmc" and posterior.n_samples == 2
    # calls, steps and the time accounting
    assert summary["calls"] == {"initial": N_INITIAL, "explore": BUDGET, "test": 4}
    assert summary["fraction_md_steps_with_call"] == pytest.approx(BUDGET / summary["md_steps"])
    t = summary["timings_s"]
    assert t["total"] >= t["oracle"] + t["update"] + t["explore"] + t["evaluate"] > 0
    assert summary["overhead_s"] == pytest.approx(t["total"] - t["oracle"] - t["update"])
    assert summary["stop_reason"].startswith("budget used")


class Killed(BaseException):
    """Stands for a kill (KeyboardInterrupt/SIGTERM): not an Exception, so nothing catches it on the way."""


def _kill_on_call(monkeypatch, owner, name, n, after=True):
    """Make ``owner.name`` raise Killed on its n-th call (1-based), before or after doing its work."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n and not after:
            raise Killed
        result = original(*args, **kwargs)
        if calls["n"] == n:
            raise Killed
        return result

    monkeypatch.setattr(owner, name, wrapper)


KILL_POINTS = {
    # second exploration label: written to the state (pending), before the log line and the store commit
    "after pending state": (state_module.DecisionLog, "ensure", N_INITIAL + 2, False),
    # second exploration label committed to the store, before the state records it
    "after store commit": (FrameStore, "append", N_INITIAL + 1, True),
    # first update: labels committed, the continuation of the chains not started
    "before update": (sgmcmc_module, "continue_sgmcmc", 1, False),
    # second update finished, the state does not know it yet
    "after update": (sgmcmc_module, "continue_sgmcmc", 2, True),
    # during the second exploration reference call
    "during oracle call": (Oracle, "label", N_INITIAL + 4 + 2, False),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_loop_resumes_without_loss_or_duplicate(point, reference, tmp_path, monkeypatch):
    owner, name, n, after = KILL_POINTS[point]
    _kill_on_call(monkeypatch, owner, name, n, after)
    with pytest.raises(Killed):
        run_active(tiny_config(), tmp_path)
    monkeypatch.undo()
    run_active(tiny_config(), tmp_path, resume=True)
    decisions, store = _assert_no_loss_no_duplicate(tmp_path)
    ref_decisions, ref_store = _assert_no_loss_no_duplicate(reference)
    # the resumed run took the same decisions on the same structures as the uninterrupted one
    keys = ("decision", "phase", "source", "step", "outcome", "store_index")
    assert [{k: d.get(k) for k in keys} for d in decisions] == [{k: d.get(k) for k in keys} for d in ref_decisions]
    for mine, theirs in zip(store.atoms(), ref_store.atoms()):
        np.testing.assert_allclose(mine.positions, theirs.positions, atol=1e-6)
        assert mine.get_potential_energy() == pytest.approx(theirs.get_potential_energy(), abs=1e-6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["calls"]["explore"] >= BUDGET and summary["updates"] == 1 + BUDGET
    reference_posterior = load_posterior(reference / "model" / "posterior.h5")
    resumed = load_posterior(tmp_path / "model" / "posterior.h5")
    for key, value in reference_posterior.samples.items():
        torch.testing.assert_close(resumed.samples[key], value, rtol=1e-6, atol=1e-8)


def test_interval_rule_calls_every_n_walker_steps_and_resumes_at_the_same_steps(tmp_path, monkeypatch):
    """The fixed-interval baseline: two walkers (600 K and 1,200 K) call at walker steps 10, 20, 30, ... exactly,
    and a kill during a reference call resumes at the same steps."""
    cfg = tiny_config(rule={"kind": "interval", "every": 10}, budget={"max_calls": 4},
                      explore={"kind": "md", "starts": {"path": str(BUNDLED_ETHANOL_TRAIN), "index": "0:2"},
                               "steps": 40, "chunk_steps": 20, "min_gap": 5, "temperature_K": [600, 1200]})
    run_active(cfg, tmp_path / "whole")
    decisions, _ = _assert_no_loss_no_duplicate(tmp_path / "whole")
    calls = [(d["source"], d["step"]) for d in decisions if d["phase"] == "explore"]
    assert calls == [("md walker 0", 10), ("md walker 1", 10), ("md walker 0", 20), ("md walker 1", 20)]
    _kill_on_call(monkeypatch, Oracle, "label", N_INITIAL + 4 + 3, after=False)  # during the third MD call
    with pytest.raises(Killed):
        run_active(cfg, tmp_path / "killed")
    monkeypatch.undo()
    run_active(cfg, tmp_path / "killed", resume=True)
    resumed, _ = _assert_no_loss_no_duplicate(tmp_path / "killed")
    assert [(d["source"], d["step"]) for d in resumed if d["phase"] == "explore"] == calls
    with pytest.raises(ValueError, match=r"rule.every=15: expected a multiple of explore.uq_every \(10\)"):
        run_active(dict(cfg, rule={"kind": "interval", "every": 15},
                        explore=dict(cfg["explore"], uq_every=10)), tmp_path / "bad")


class Scripted(Calculator):
    """GFN2-xTB, except for the calls that ``plan`` (shared by every instance) scripts to fail."""

    implemented_properties = ["energy", "forces"]
    plan: list = []

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        mode = Scripted.plan.pop(0) if Scripted.plan else "ok"
        if mode == "raise":
            raise RuntimeError("the reference code crashed")
        copy = self.atoms.copy()
        copy.calc = TBLite(method="GFN2-xTB", verbosity=0)
        self.results = {"energy": copy.get_potential_energy(), "forces": copy.get_forces()}
        if mode == "nan":
            self.results["forces"][0, 0] = np.nan


def collapse_first_chunk(monkeypatch):
    """Make the first MD chunk of the loop collapse: atom 1 is sent onto atom 0 within one time step."""
    original, calls = explore_module.run_md, []

    def run_md(atoms, calculator, **kwargs):
        if not calls:
            momenta = atoms.get_momenta()
            dt = kwargs["timestep_fs"] * units.fs
            momenta[1] = atoms.get_masses()[1] * (atoms.positions[0] - atoms.positions[1]) / dt
            atoms.set_momenta(momenta)
        result = original(atoms, calculator, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(explore_module, "run_md", run_md)
    return calls


def test_failures_are_recorded_and_skipped_and_a_rejected_composition_is_never_retried(tmp_path, monkeypatch):
    chunks = collapse_first_chunk(monkeypatch)
    ethanol = ase.io.read(BUNDLED_ETHANOL_TRAIN, 0)
    ethylamine = molecule("CH3CH2NH2")  # N: not in the oracle's element list
    ase.io.write(tmp_path / "starts.extxyz", [ethanol, ethylamine])
    cfg = tiny_config(test=None, budget={"max_calls": 4}, rule={"kind": "force_std", "threshold": 0.01})
    cfg["explore"]["starts"] = {"path": str(tmp_path / "starts.extxyz"), "index": ":"}
    Scripted.plan = ["ok"] * N_INITIAL + ["raise", "nan"]  # the first two exploration calls fail
    oracle = Oracle(Scripted, name="scripted GFN2-xTB", elements=["H", "C", "O"])
    out = tmp_path / "run"
    run_active(cfg, out, oracle=oracle)
    decisions, store = _assert_no_loss_no_duplicate(out)
    explore = [d for d in decisions if d["phase"] == "explore"]
    walker1 = [d for d in explore if d["source"] == "md walker 1"]
    assert len(walker1) == 1 and walker1[0]["outcome"] == "rejected" and not walker1[0]["called"]
    assert "'N'" in walker1[0]["message"]
    walker0 = [d for d in explore if d["source"] == "md walker 0"]
    assert [d["outcome"] for d in walker0] == ["failed", "failed", "labelled", "labelled"]
    assert "crashed" in walker0[0]["message"] and "NaN" in walker0[1]["message"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calls"]["explore"] == 4  # failed calls count against the budget; the rejection made none
    assert list(summary["rejected_compositions"]) == ["C-H-N"]
    assert len(store) == N_INITIAL + 2 and summary["updates"] == 3
    state = json.loads((out / "state.json").read_text())
    walkers = state["explorer"]["walkers"]
    # collapsed dynamics end the chunk where they stand and send the walker back to its start, like a failed call
    assert chunks[0].collapsed and chunks[0].steps_done == 0 and "collapsed during step 1" in chunks[0].stop_reason
    assert walkers[1]["done"] and walkers[0]["restarts"] == 1 + 2


def test_a_reached_target_stops_the_loop(tmp_path):
    run_active(tiny_config(budget={"max_calls": 5, "target_forces_mae": 10.0}), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"].startswith("target reached") and summary["calls"]["explore"] == 0


def test_calibrated_rule_learns_its_scale_from_the_calls(tmp_path):
    cfg = tiny_config(test=None, budget={"max_calls": 2},
                      rule={"kind": "calibrated", "tolerance": 0.3, "probability": 0.5, "prior_weight": 9})
    run_active(cfg, tmp_path)
    decisions, _ = _assert_no_loss_no_duplicate(tmp_path)
    explore = [d for d in decisions if d["phase"] == "explore"]
    assert len(explore) == 2 and all(d["probability"] > 0.5 for d in explore)
    state = json.loads((tmp_path / "state.json").read_text())
    rule = state["rule"]
    assert rule["n_atoms"] == 2 * 9 and rule["prior_scale"] > 0  # s0 from the initial set, then two calls
    assert explore[0]["scale"] == pytest.approx(rule["prior_scale"])  # before any call: the prior alone
    assert explore[1]["scale"] != explore[0]["scale"]  # after one call: moved by its residuals
    history = state["history"]
    assert history[-1]["calibration_scale"] == pytest.approx(
        np.sqrt((9 * rule["prior_scale"] ** 2 + rule["sum_z2"]) / (9 + rule["n_atoms"])))


def test_a_posterior_that_predicts_nan_stops_the_loop_with_a_clear_error(tmp_path, monkeypatch):
    original = update_module.Updater.fit

    def diverged(self, train, val, index, resume, metadata):
        path = original(self, train, val, index, resume, metadata)
        if index == 1:  # the first update: a sample of a chain that blew up between two samples
            posterior = load_posterior(path)
            for tensor in posterior.samples.values():
                tensor[-1] = 1e31
            posterior.save(path)
        return path

    monkeypatch.setattr(update_module.Updater, "fit", diverged)
    with pytest.raises(RuntimeError, match="update 1 .* predicts NaN/inf forces on its own training structures"):
        run_active(tiny_config(test=None), tmp_path)


def test_pool_with_a_deep_ensemble_fine_tunes_the_members(tmp_path):
    cfg = tiny_config(test=None, budget={"max_calls": 2}, rule={"kind": "top_k"},
                      explore={"kind": "pool", "batch": 2,
                               "pool": {"path": str(BUNDLED_ETHANOL_TRAIN), "n": 30}},
                      update={"max_epochs": 2})
    cfg["train"] = {"method": "ensemble", "model": cfg["train"]["model"], "ensemble": {"n_members": 2},
                    "training": {"max_epochs": 3, "batch_size": 3}, "data": {"split": {"val_fraction": 0.5}}}
    run_active(cfg, tmp_path)
    decisions, store = _assert_no_loss_no_duplicate(tmp_path)
    explore = [d for d in decisions if d["phase"] == "explore"]
    assert len(explore) == 2 and explore[0]["uncertainty"] >= explore[1]["uncertainty"]  # most uncertain first
    assert len({d["source"] for d in explore}) == 2
    first, second = (load_posterior(tmp_path / "model" / f"round{u:03d}" / "posterior.h5") for u in (0, 1))
    assert first.method == second.method == "ensemble" and second.hyperparameters["warm_start"]
    assert not first.hyperparameters["warm_start"]
    # the new labels are divided at the initial split's validation fraction: 3 of 6, then 1 of the 2 new ones
    history = json.loads((tmp_path / "summary.json").read_text())["history"]
    assert [(h["n_train"], h["n_val"]) for h in history] == [(N_INITIAL, 3), (N_INITIAL + 2, 4)]


def test_command_line_runs_and_resumes_with_a_larger_budget(tmp_path, capsys):
    import yaml

    config = tmp_path / "active.yaml"
    config.write_text(yaml.safe_dump(tiny_config(test=None)))
    out = tmp_path / "run"
    assert main(["active", str(config), "--out", str(out), "budget.max_calls=1"]) == 0
    assert "1 during exploration" in capsys.readouterr().out
    assert main(["active", str(config), "--out", str(out), "budget.max_calls=2"]) == 2  # exists: needs --resume
    assert "already holds" in capsys.readouterr().err
    assert main(["active", str(config), "--out", str(out), "--resume", "budget.max_calls=2"]) == 0
    assert "2 during exploration" in capsys.readouterr().out
    _assert_no_loss_no_duplicate(out)
    assert main(["active", str(config), "--out", str(out), "--resume", "explore.steps=10"]) == 2
    assert "only the budget may change" in capsys.readouterr().err
