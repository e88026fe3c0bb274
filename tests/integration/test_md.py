"""Uncertainty-aware MD: energy conservation, the stop rule in and out of distribution, callbacks, files, NPT, CLI.

The stop-rule test needs a posterior that has seen TiO2: a tiny SG-MCMC run (2 chains from their own
initialisations, 4 samples each) on 40 structures of the bundled subset, trained once per session (~15 s).
"""

import csv
import json
import re

import ase.io
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from conftest import run_and_kill, seeded_posterior, tiny_tio2_config

from mlip_uq import UQCalculator
from mlip_uq.calculator import CollapsedAtomsError
from mlip_uq.cli import main
from mlip_uq.md import RECORD_KEYS, ForceStdRule, run_md
from mlip_uq.model import ModelConfig
from mlip_uq.posterior import Posterior, load_posterior
from mlip_uq.train import train


@pytest.fixture(scope="session")
def trained(tio2_path, tio2_store, tmp_path_factory):
    """Output folder of a tiny SG-MCMC run on TiO2 (posterior.h5 with K = 8, splits.json). The noise stays as
    sampled: the rule below reads the spread between the samples, and held-out noise (the default) would add a
    per-element floor to every atom's std that this tiny model's 8 validation cells fix only roughly."""
    out = tmp_path_factory.mktemp("md_sgmcmc")
    cfg = tiny_tio2_config(tio2_path, 40, 8, tio2_store, method="sgmcmc", sgmcmc={
        "lr": 2e-4, "batch_size": 8, "burnin_steps": 150, "preheat_steps": 10, "n_samples": 4, "thinning": 5,
        "n_chains": 2, "noise_from_validation": False})
    return train(cfg, out_dir=out)


@pytest.fixture(scope="module")
def frames(tio2_path):
    return ase.io.read(tio2_path, ":")


def bare(atoms):
    return ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def tiny_posterior(k=2):
    config = ModelConfig(type_names=["O", "Ti"], r_max=3.5, num_layers=1, num_features=4, radial_mlp_width=8,
                         avg_num_neighbors=15.0, dtype="float64")
    return seeded_posterior(config, seeds=range(k))


def test_nve_energy_drift_of_the_mean_model_is_bounded(trained, frames):
    post = load_posterior(trained / "posterior.h5")
    mean_of_two = Posterior(post.config, post.shared, {n: t[:2] for n, t in post.samples.items()})
    atoms = bare(frames[0])
    # the force std is checked at the logged steps only: the trajectory does not depend on uq_every (the dynamics
    # read the mean forces), and a step between checks costs one pull-back instead of K
    result = run_md(atoms, UQCalculator(mean_of_two), steps=500, timestep_fs=1.0, temperature_K=300.0,
                    ensemble="nve", log_every=10, uq_every=10, progress=False)
    assert result.steps_done == 500 and not result.stopped and len(result.records) == 51
    total = np.array([r["energy"] + r["kinetic_energy"] for r in result.records]) / len(atoms)
    kinetic = np.array([r["kinetic_energy"] for r in result.records]) / len(atoms)
    slope = np.polyfit([r["time_fs"] / 1000 for r in result.records], total, 1)[0]
    assert np.ptp(kinetic) > 0.01  # energy really flows between kinetic and potential (eV/atom)
    assert np.max(np.abs(total - total[0])) < 5e-4  # eV/atom, against ~1e-2 eV/atom exchanged
    assert abs(slope) < 1e-4  # eV/atom per ps


def test_stop_rule_fires_on_compressed_tio2_and_not_in_equilibrium_md(trained, frames):
    calc = UQCalculator(trained / "posterior.h5")
    assert calc.posterior.n_samples == 8
    train_idx = json.loads((trained / "splits.json").read_text())["train"]
    largest = []
    for i in train_idx:
        atoms = bare(frames[i])
        atoms.calc = calc
        largest.append(calc.get_property("atom_force_std", atoms).max())
    # above the largest seen on training data; for this posterior the equilibrium run stays below 0.55 of it and the
    # compressed cell starts at 1.4 times it (margins of ~40 % both ways)
    rule = ForceStdRule(threshold=1.4 * max(largest), consecutive=2)

    equilibrium = run_md(bare(frames[train_idx[0]]), calc, steps=100, temperature_K=300.0, stop_rule=rule,
                         progress=False)
    assert not equilibrium.stopped and equilibrium.steps_done == 100
    assert max(r["max_atom_force_std"] for r in equilibrium.records) < rule.threshold

    compressed = bare(frames[train_idx[0]])
    compressed.set_cell(compressed.cell * 0.85, scale_atoms=True)
    result = run_md(compressed, calc, steps=50, temperature_K=300.0, stop_rule=rule, progress=False)
    assert result.stopped and result.steps_done == 1  # above the threshold at steps 0 and 1
    assert "stop rule fired at step 1" in result.stop_reason
    assert result.records[-1]["max_atom_force_std"] > rule.threshold


def test_on_uncertain_is_called_whenever_the_rule_fires(frames):
    calc = UQCalculator(tiny_posterior())
    always = ForceStdRule(threshold=1e-12, consecutive=3)
    stopped = run_md(bare(frames[0]), calc, steps=10, stop_rule=always, progress=False)
    assert stopped.stopped and stopped.steps_done == 2  # steps 0, 1, 2 above: fires at step 2

    calls = []

    def collect(step, atoms, record):
        calls.append((step, record["step"], atoms.calc.results["atom_force_std"].shape))
        return len(calls) == 4

    result = run_md(bare(frames[0]), calc, steps=10, stop_rule=always, on_uncertain=collect, log_every=5,
                    progress=False)
    assert [c[0] for c in calls] == [2, 3, 4, 5] and all(c[0] == c[1] for c in calls)
    assert result.stopped and result.steps_done == 5 and "on_uncertain asked to stop" in result.stop_reason
    assert [r["step"] for r in result.records] == [0, 2, 3, 4, 5]  # logged steps and firing steps

    never = run_md(bare(frames[0]), calc, steps=5, stop_rule=ForceStdRule(1e6), on_uncertain=collect,
                   progress=False)
    assert not never.stopped and never.steps_done == 5 and len(calls) == 4


def first_above(trace, threshold, every):
    """The first step, among multiples of ``every``, whose max atom force std is above ``threshold`` (or None)."""
    return next((s for s in sorted(trace) if s % every == 0 and trace[s] > threshold), None)


def test_checking_every_10_steps_stops_at_the_check_the_every_step_run_would(frames):
    k, steps = 3, 60
    reference = run_md(bare(frames[0]), UQCalculator(tiny_posterior(k)), steps=steps, temperature_K=2000.0, seed=3,
                       progress=False)
    trace = {r["step"]: r["max_atom_force_std"] for r in reference.records}
    # a threshold that the every-step run crosses between two checks, before the first check above it
    threshold = next(t for t in sorted(trace.values())
                     if (first_above(trace, t, 10) or 0) > first_above(trace, t, 1) and first_above(trace, t, 10))
    expected, earlier = first_above(trace, threshold, 10), first_above(trace, threshold, 1)
    rule = ForceStdRule(threshold)
    every_step = run_md(bare(frames[0]), UQCalculator(tiny_posterior(k)), steps=steps, temperature_K=2000.0, seed=3,
                        stop_rule=rule, progress=False)
    assert every_step.stopped and every_step.steps_done == earlier
    calc = UQCalculator(tiny_posterior(k))
    checked = run_md(bare(frames[0]), calc, steps=steps, temperature_K=2000.0, seed=3, stop_rule=rule, uq_every=10,
                     progress=False)
    assert checked.stopped and checked.steps_done == expected > earlier
    assert checked.checks == expected // 10 + 1
    # one pull-back per step for the mean forces, K - 1 more at each check
    assert calc.pullbacks == (expected + 1) + (k - 1) * checked.checks
    assert calc.keep_trunk_graph  # run_md set it per step and gave it back as it found it
    for r in checked.records:
        ref = reference.records[r["step"]]
        assert r["energy"] == ref["energy"] and r["max_atom_energy_std"] == ref["max_atom_energy_std"] > 0
        if r["step"] % 10:
            assert np.isnan(r["max_atom_force_std"]) and np.isnan(r["mean_atom_force_std"])
        else:
            assert r["max_atom_force_std"] == pytest.approx(ref["max_atom_force_std"], rel=1e-12)
    with pytest.raises(ValueError, match="uq_every"):
        run_md(bare(frames[0]), calc, steps=1, uq_every=0)


def test_relative_rule_divides_by_the_force_magnitude():
    rule = ForceStdRule(threshold=0.5, relative=True, eps=0.1)
    std = np.array([0.1, 0.3])
    forces = np.array([[0.0, 0.0, 0.0], [0.3, 0.4, 0.0]])  # |F| = 0 and 0.5 eV/Å
    assert rule.measure(std, forces) == pytest.approx(max(0.1 / 0.1, 0.3 / 0.6))
    assert rule.check(std, forces)
    assert not ForceStdRule(threshold=0.5).check(std, forces)
    with pytest.raises(ValueError, match="threshold"):
        ForceStdRule(threshold=0.0)
    with pytest.raises(ValueError, match="consecutive"):
        ForceStdRule(threshold=1.0, consecutive=0)


def test_md_writes_trajectory_log_and_plot(frames, tmp_path):
    atoms = bare(frames[0])
    result = run_md(atoms, UQCalculator(tiny_posterior()), steps=20, ensemble="langevin", out_dir=tmp_path,
                    log_every=5, stop_rule=ForceStdRule(1e6), progress=False)
    assert result.trajectory_path == tmp_path / "trajectory.extxyz"
    rows = list(csv.DictReader(open(result.log_path)))
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20] and tuple(rows[0]) == RECORD_KEYS
    assert float(rows[-1]["time_fs"]) == 20.0 and float(rows[-1]["max_atom_force_std"]) > 0
    traj = ase.io.read(result.trajectory_path, ":")
    assert len(traj) == 5 and traj[-1].info["step"] == 20
    np.testing.assert_allclose(traj[-1].positions, atoms.positions, atol=1e-7)
    np.testing.assert_allclose(traj[-1].arrays["atom_force_std"].max(), result.records[-1]["max_atom_force_std"],
                               rtol=1e-6)
    assert traj[-1].get_forces().shape == (len(atoms), 3) and "energy_std" in traj[-1].info
    assert result.plot_path.stat().st_size > 10_000 and result.plot_path.read_bytes()[:4] == b"\x89PNG"


def test_npt_changes_the_cell_and_rebuilds_the_neighbour_list(frames):
    atoms = bare(frames[0])
    volume = atoms.get_volume()
    calc = UQCalculator(tiny_posterior())
    result = run_md(atoms, calc, steps=10, ensemble="npt", pressure_GPa=50.0, timestep_fs=2.0, progress=False)
    assert result.steps_done == 10 and atoms.get_volume() != volume
    assert calc.neighbor_list_builds == 11  # every new cell gets a new list
    with pytest.raises(ValueError, match="ensemble must be one of"):
        run_md(atoms, calc, steps=1, ensemble="nvt-magic")
    with pytest.raises(ValueError, match="periodic in all three directions"):
        slab = bulk("TiO", "rocksalt", a=4.2)
        slab.pbc = [True, True, False]
        run_md(slab, calc, steps=1, ensemble="npt")


def test_md_command(frames, tmp_path, capsys):
    tiny_posterior().save(tmp_path / "p.h5")
    ase.io.write(tmp_path / "start.xyz", bare(frames[0]))
    rc = main(["md", str(tmp_path / "p.h5"), str(tmp_path / "start.xyz"), "--steps", "4", "--max-force-std", "1e-9",
               "--consecutive", "2", "--out", str(tmp_path / "run"), "--ensemble", "nve", "--timestep", "0.5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1 steps; stopped: stop rule fired at step 1" in printed
    rc = main(["md", str(tmp_path / "p.h5"), str(tmp_path / "start.xyz"), "--steps", "4", "--max-force-std", "1e-9",
               "--consecutive", "2", "--uq-every", "3", "--out", str(tmp_path / "run3"), "--ensemble", "nve"])
    assert rc == 0 and "3 steps; stopped: stop rule fired at step 3" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "run3" / "md_log.csv")))
    assert [np.isnan(float(r["max_atom_force_std"])) for r in rows] == [False, True, True, False]
    assert (tmp_path / "run" / "uncertainty.png").is_file() and (tmp_path / "run" / "md_log.csv").is_file()


def test_a_killed_md_command_keeps_the_earlier_run_and_its_own_rows(frames, tmp_path):
    tiny_posterior().save(tmp_path / "p.h5")
    ase.io.write(tmp_path / "start.xyz", bare(frames[0]))
    out = tmp_path / "run"
    command = ["md", str(tmp_path / "p.h5"), str(tmp_path / "start.xyz"), "--out", str(out), "--ensemble", "nve",
               "--uq-every", "2"]
    assert main(command + ["--steps", "3"]) == 0  # an earlier, complete run
    earlier = {name: (out / name).read_bytes() for name in ("md_log.csv", "trajectory.extxyz")}
    partial_log = out / "md_log.csv.partial"
    run_and_kill(command + ["--steps", "100000"], partial_log, rows=6, timeout_s=120)
    for name, content in earlier.items():  # the earlier run's files are as they were
        assert (out / name).read_bytes() == content, name
    rows = list(csv.DictReader(open(partial_log)))
    assert len(rows) >= 6
    # every row written has its frame, complete, before it (a frame is flushed before its row)
    traj = ase.io.read(out / "trajectory.extxyz.partial", f":{len(rows)}", format="extxyz")
    assert len(traj) == len(rows)
    for i, (row, frame) in enumerate(zip(rows, traj)):
        assert int(row["step"]) == frame.info["step"] == i
        assert float(row["energy"]) == pytest.approx(frame.get_potential_energy(), abs=1e-7)
        checked = i % 2 == 0
        assert np.isnan(float(row["max_atom_force_std"])) != checked
        assert ("atom_force_std" in frame.arrays) == checked  # no stale copy from the last check
        if checked:
            assert float(row["max_atom_force_std"]) == pytest.approx(frame.arrays["atom_force_std"].max(), rel=1e-6)


def test_md_command_errors_name_the_problem(frames, tmp_path, capsys):
    tiny_posterior().save(tmp_path / "p.h5")
    ase.io.write(tmp_path / "two.extxyz", [bare(frames[0]), bare(frames[1])])
    base = ["md", str(tmp_path / "p.h5"), str(tmp_path / "two.extxyz"), "--steps", "2", "--out", str(tmp_path / "o")]
    assert main(base + ["--index", "5"]) == 2
    err = capsys.readouterr().err
    assert "--index 5" in err and "has 2 frame(s)" in err and "Traceback" not in err
    assert main(base + ["--temperature", "-10"]) == 2
    err = capsys.readouterr().err
    assert "temperature_K must be >= 0 K, got -10.0" in err
    assert not (tmp_path / "o" / "md_log.csv").exists()


def test_dynamics_that_collapse_two_atoms_end_the_run_as_a_result(frames, tmp_path):
    atoms = bare(frames[0])
    momenta = np.zeros((len(atoms), 3))
    momenta[5] = atoms.get_masses()[5] * (atoms.positions[2] - atoms.positions[5]) / units.fs  # onto atom 2
    atoms.set_momenta(momenta)
    result = run_md(atoms, UQCalculator(tiny_posterior()), steps=10, ensemble="nve", out_dir=tmp_path,
                    progress=False)
    assert result.collapsed and result.stopped and result.steps_done == 0
    assert re.search(r"atoms collapsed during step 1: atoms closer than 0.1 Å .*(2 and 5|5 and 2)",
                     result.stop_reason)
    assert np.linalg.norm(atoms.positions[5] - atoms.positions[2]) < 0.1  # where the dynamics left them
    rows = list(csv.DictReader(open(result.log_path)))  # the run's files are in place, up to step 0
    assert [int(r["step"]) for r in rows] == [0] and not list(tmp_path.glob("*.partial"))


def test_coincident_atoms_are_named_before_the_model_runs(frames):
    atoms = bare(frames[0])
    atoms.positions[5] = atoms.positions[2] + [0.03, 0.0, 0.0]
    atoms.calc = UQCalculator(tiny_posterior())
    with pytest.raises(CollapsedAtomsError, match=r"atoms closer than 0.1 Å .*: (2 and 5|5 and 2) at 0.03 Å"):
        atoms.get_forces()
    with pytest.raises(CollapsedAtomsError, match="closer than"):  # a collapsed start is bad input
        run_md(atoms, atoms.calc, steps=1, progress=False)
