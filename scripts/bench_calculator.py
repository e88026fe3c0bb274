"""Cost per MD step of the UQCalculator with K posterior samples, against nequip's own ASE calculator.

Periodic TiO2 cells (the first frame of the bundled aenet subset repeated and rattled; 96 and 768 atoms by
default) and the architecture of ``scripts/bench_model.py`` (165k parameters, float64). For each K in
``--ks`` and each cell, in one process and interleaved call by call:

- **nequip, one model**: ``nequip.integrations.ase.NequIPCalculator`` on one ``GraphModel`` whose parameters do
  not require gradients (like for like with ours, see bench_model.py), vesin neighbour list;
- **nequip, loop of K**: K such calculators (the K samples of the full posterior) called one after another;
- **ours, full**: ``UQCalculator`` on a fully Bayesian posterior of K samples (every parameter differs);
- **ours, partial**: ``UQCalculator`` on a partially Bayesian posterior (only the energy readout differs):
  the trunk runs once, the readout K times, and each sample's forces are pulled back through the trunk;
- **ours, partial, batched pull-back**: the same with the K pull-backs as one batched vector-Jacobian product
  (``predict_samples(..., batched=True)``, the default on a GPU), on the graph the calculator built.

One MD step costs one energy + forces + stress call on moved positions: before every call all atoms move by
1e-3 Å (random directions), so our calculator reuses its neighbour list (skin 0.5 Å) as in MD, while nequip's
rebuilds it (as it does in MD). Every call is timed with ``time.perf_counter`` after one warm-up call per path;
rounds of one call per path are repeated with the order rotating, and the table holds medians over rounds.
Peak memory: the growth of the resident set's high-water mark during one call over the resident set before
it, in a fresh subprocess per cell, path and K (bench_model.py's probe). No GPU is used.

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_calculator.py [--ks 1 4 8 16] [--atoms 96 768] [--rounds 3]
                                                         [--no-memory] [--out docs/benchmarks.md]

Prints one progress line per cell and K, then a markdown table, and writes (or replaces) its own section of
``--out``, leaving the other sections as they are.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402  (the shared cell, architecture, section writer, machine and memory probe)
    REPO,
    fmt,
    load_average,
    machine,
    machine_busy,
    make_cell,
    model_config,
    update_section,
)
from _harness import reset_peak_rss as _reset_peak_rss, status_kib as _status_kib  # noqa: E402

SECTION_TITLE = "## Calculator cost per MD step with K samples (scripts/bench_calculator.py)"
REPEATS = {96: (2, 1, 2), 768: (4, 2, 4)}  # of the 24-atom base cell
MOVE = 1e-3  # Å, displacement of every atom before each call
PATHS = ("nequip_one", "nequip_loop", "full", "partial", "partial_batched")


class Setup:
    """The calculators of one K: K full samples, K partial samples, and nequip on the same weights."""

    def __init__(self, k: int):
        from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
        from nequip.integrations.ase import NequIPCalculator

        from mlip_uq import UQCalculator
        from mlip_uq.inference.priors import select_stochastic
        from mlip_uq.model import ModelConfig, build_model
        from mlip_uq.posterior import Posterior

        self.config = model_config("float64")
        models = [build_model(ModelConfig.from_dict({**self.config.to_dict(), "seed": s})).eval() for s in range(k)]
        sds = [m.state_dict() for m in models]
        heads = select_stochastic(models[0], {"last_layers": 1})
        partial = [dict(sds[0], **{n: sd[n] for n in heads}) for sd in sds]
        self.full = UQCalculator(Posterior.from_state_dicts(self.config, sds))
        self.partial = UQCalculator(Posterior.from_state_dicts(self.config, partial, stochastic=heads))
        transforms = [ChemicalSpeciesToAtomTypeMapper(model_type_names=self.config.type_names),
                      NeighborListTransform(r_max=self.config.r_max, backend="vesin")]
        self.nequip = [NequIPCalculator(copy.deepcopy(m).requires_grad_(False), device="cpu", transforms=transforms)
                       for m in models]

    def call(self, path: str, atoms) -> None:
        from ase.calculators.calculator import all_changes

        from mlip_uq.posterior.predict import predict_samples, predictive_moments

        props = ["energy", "forces", "stress"]
        if path == "nequip_one":
            self.nequip[0].calculate(atoms, props, all_changes)
        elif path == "nequip_loop":
            for calc in self.nequip:
                calc.calculate(atoms, props, all_changes)
        elif path == "partial_batched":
            calc = self.partial
            predictive_moments(predict_samples(calc.posterior, calc._graph(atoms), batched=True))
        else:
            getattr(self, path).calculate(atoms, props, all_changes)


def time_cell(setup: Setup, n_atoms: int, rounds: int, seed: int = 0) -> Dict[str, List[float]]:
    """Seconds per call of every path, one list entry per round."""
    atoms = make_cell(REPEATS[n_atoms])
    rng = np.random.default_rng(seed)
    times: Dict[str, List[float]] = {p: [] for p in PATHS}
    for path in PATHS:  # warm-up
        setup.call(path, atoms)
    for r in range(rounds):
        for path in PATHS[r % len(PATHS):] + PATHS[: r % len(PATHS)]:
            step = rng.normal(size=atoms.positions.shape)
            atoms.positions += MOVE * step / np.linalg.norm(step, axis=1, keepdims=True)
            t0 = time.perf_counter()
            setup.call(path, atoms)
            times[path].append(time.perf_counter() - t0)
    return times


def memory_probe(path: str, n_atoms: int, k: int) -> float:
    """Peak resident-set growth (MiB) during one call of ``path`` (this process; see bench_model.py)."""
    setup = Setup(k)
    setup.call(path, make_cell((1, 1, 1)))
    atoms = make_cell(REPEATS[n_atoms])
    gc.collect()
    if not (_reset_peak_rss() and _status_kib("VmHWM") is not None):
        return float("nan")
    before = _status_kib("VmRSS")
    setup.call(path, atoms)
    return (_status_kib("VmHWM") - before) / 1024.0


def measure_memory(path: str, n_atoms: int, k: int) -> Optional[float]:
    proc = subprocess.run([sys.executable, __file__, "--memory-probe", f"{path}:{n_atoms}:{k}"], capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        print(f"memory probe {path}:{n_atoms}:{k} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def _mib(x: Optional[float]) -> str:
    # below 1 MiB the call fitted in heap memory freed earlier in the probe process (e.g. by building K models)
    return "~0†" if x is not None and x < 1.0 else fmt(x, 0)


def ratio(times: Dict[str, List[float]], path: str, reference: str) -> float:
    """Median over rounds of path / reference within the same round (drifts of the machine's speed cancel)."""
    return statistics.median(a / b for a, b in zip(times[path], times[reference]))


def mace_probe(n_atoms: int, ks: List[int], rounds: int) -> Dict:
    """Run under a Python with mace-torch (its own venv: mace-torch pins e3nn 0.4.4): ms per call of a MACE
    committee (``MACECalculator(models=[...])``) of K randomly initialised models, for each K (medians)."""
    import torch
    from ase.calculators.calculator import all_changes
    from e3nn import o3
    from mace import modules
    from mace.calculators import MACECalculator

    torch.set_default_dtype(torch.float64)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]

    def model(seed: int):
        torch.manual_seed(seed)
        return modules.ScaleShiftMACE(
            r_max=5.0, num_bessel=8, num_polynomial_cutoff=6, max_ell=3, interaction_cls=block,
            interaction_cls_first=block, num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps("32x0e+32x1o"),
            MLP_irreps=o3.Irreps("16x0e"), gate=torch.nn.functional.silu, atomic_energies=np.array([-432.5, -1604.6]),
            avg_num_neighbors=50.0, atomic_numbers=[8, 22], correlation=3, radial_type="bessel",
            atomic_inter_scale=1.0, atomic_inter_shift=0.0)

    models = [model(s) for s in range(max(ks))]
    atoms = make_cell(REPEATS[n_atoms])
    out = {"params": sum(p.numel() for p in models[0].parameters()), "ms": {}}
    for k in ks:
        calc = MACECalculator(models=models[:k], device="cpu", default_dtype="float64")
        calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)  # warm-up
        times = []
        for _ in range(rounds):
            atoms.positions += MOVE
            t0 = time.perf_counter()
            calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
            times.append(time.perf_counter() - t0)
        out["ms"][k] = 1e3 * statistics.median(times)
    return out


def measure_mace(python: str, n_atoms: int, ks: List[int], rounds: int) -> Optional[Dict]:
    # e3nn 0.4.4 reads its own bundled constants with torch.load, which torch >= 2.6 refuses by default
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run([python, __file__, "--mace-probe", f"{n_atoms}:{','.join(map(str, ks))}:{rounds}"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        print(f"MACE probe failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: List[Dict]) -> str:
    head = (
        "| atoms | edges | K | nequip, 1 model ms | nequip, loop of K ms | ours full ms | full / 1 model "
        "| full / loop of K | ours partial ms | partial / 1 model | partial, batched pull-back ms "
        "| MACE committee of K ms (1 model) | peak ΔRSS MiB nequip 1 / full / partial | rounds |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        ms = {p: 1e3 * statistics.median(r["times"][p]) for p in PATHS}
        mem = " / ".join(_mib(r["memory"].get(p)) for p in ("nequip_one", "full", "partial")) \
            if r["memory"] else "–"
        t = r["times"]
        mace = f"{fmt(r['mace'][0])} ({fmt(r['mace'][1])})" if r.get("mace") else "–"
        lines.append(
            f"| {r['atoms']:,} | {r['edges']:,} | {r['k']} | {fmt(ms['nequip_one'])} | {fmt(ms['nequip_loop'])} "
            f"| {fmt(ms['full'])} | {ratio(t, 'full', 'nequip_one'):.2f}x | {ratio(t, 'full', 'nequip_loop'):.2f}x "
            f"| {fmt(ms['partial'])} | {ratio(t, 'partial', 'nequip_one'):.2f}x | {fmt(ms['partial_batched'])} "
            f"| {mace} | {mem} | {len(t['full'])} |"
        )
    return "\n".join(lines)


def reading(rows: List[Dict]) -> str:
    """The targets (partial K = 8 at most 1.5x one model; full K = 8 at most a loop of 8) against the numbers."""
    lines = []
    for r in rows:
        if r["k"] != 8:
            continue
        t = r["times"]
        partial, full = ratio(t, "partial", "nequip_one"), ratio(t, "full", "nequip_loop")
        lines.append(f"{r['atoms']} atoms, K = 8: partial {partial:.2f}x one model (target <= 1.5x: "
                     f"{'met' if partial <= 1.5 else 'not met'}), full {full:.2f}x a loop of 8 (target <= 1: "
                     f"{'met' if full <= 1.0 else 'not met'}); batched pull-back "
                     f"{ratio(t, 'partial_batched', 'partial'):.2f}x the one-at-a-time pull-back.")
    for n_atoms in sorted({r["atoms"] for r in rows}):
        cell = sorted((r for r in rows if r["atoms"] == n_atoms), key=lambda r: r["k"])
        if len(cell) < 2:
            continue
        ks = [r["k"] for r in cell]
        one = statistics.median(1e3 * statistics.median(r["times"]["nequip_one"]) for r in cell)
        slope = {p: np.polyfit(ks, [1e3 * statistics.median(r["times"][p]) for r in cell], 1)[0]
                 for p in ("full", "partial")}
        lines.append(f"{n_atoms} atoms: each extra sample adds {slope['full'] / one:.2f} of one model call to the full "
                     f"posterior and {slope['partial'] / one:.2f} to the partial one (least-squares slope over K).")
    return "\n".join(f"- {line}" for line in lines)


def mace_note(mace: Optional[Dict], args) -> str:
    if not args.mace_python:
        return "not measured (no Python with mace-torch given: `--mace-python`)."
    if mace is None:
        return "the MACE run failed (see the script's output); not measured."
    return (f"mace-torch's `MACECalculator(models=[...])` (it evaluates the K models one after another) on K randomly "
            f"initialised `ScaleShiftMACE` models (2 interactions, hidden 32x0e+32x1o, max_ell 3, correlation 3, "
            f"r_max 5 Å, {mace['params']:,} parameters, float64), in its own venv (mace-torch pins e3nn 0.4.4, "
            f"run with `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` because e3nn 0.4.4 reads its bundled constants with "
            f"`torch.load`), on the {args.mace_atoms}-atom cell only, {args.rounds} rounds; a different architecture, "
            f"so compare how its cost grows with K rather than its absolute cost. In brackets: one MACE model.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16], help="numbers of samples K")
    parser.add_argument("--atoms", type=int, nargs="+", default=[96, 768], choices=sorted(REPEATS))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cell and K")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--mace-python", help="a Python with mace-torch (e.g. /tmp/mace_venv/bin/python): also time "
                        "MACE committees of the same K on the --mace-atoms cell")
    parser.add_argument("--mace-atoms", type=int, default=96, choices=sorted(REPEATS))
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--mace-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mace_probe:
        n_atoms, ks, rounds = args.mace_probe.split(":")
        print(json.dumps(mace_probe(int(n_atoms), [int(k) for k in ks.split(",")], int(rounds))))
        return
    import torch
    from nequip.utils.global_state import set_global_state

    set_global_state()
    if args.memory_probe:
        path, n_atoms, k = args.memory_probe.split(":")
        print(json.dumps({"peak_mib": memory_probe(path, int(n_atoms), int(k))}))
        return

    started, load_start = time.perf_counter(), load_average()
    rows = []
    for k in args.ks:
        setup = Setup(k)
        for n_atoms in args.atoms:
            times = time_cell(setup, n_atoms, args.rounds)
            graph = setup.full._graph(make_cell(REPEATS[n_atoms]))
            rows.append({"atoms": n_atoms, "k": k, "times": times, "memory": {},
                         "edges": int(graph["edge_index"].shape[1])})
            med = {p: 1e3 * statistics.median(t) for p, t in times.items()}
            print(f"[{time.perf_counter() - started:6.0f} s] {n_atoms} atoms, K={k}: "
                  + ", ".join(f"{p} {v:.1f} ms" for p, v in med.items()), flush=True)
        del setup
    mace = None
    if args.mace_python:
        mace = measure_mace(args.mace_python, args.mace_atoms, args.ks, args.rounds)
        print(f"[{time.perf_counter() - started:6.0f} s] MACE committee, {args.mace_atoms} atoms: {mace}", flush=True)
        for row in rows:
            if mace and row["atoms"] == args.mace_atoms:
                row["mace"] = (mace["ms"][str(row["k"])], mace["ms"]["1"]) if "1" in mace["ms"] else None
    load_end, busy = load_average(), machine_busy(torch.get_num_threads())
    if not args.no_memory:
        for row in rows:
            for path in ("nequip_one", "full", "partial"):
                row["memory"][path] = measure_memory(path, row["atoms"], row["k"])
            print(f"[{time.perf_counter() - started:6.0f} s] memory {row['atoms']} atoms, K={row['k']}: "
                  f"{row['memory']}", flush=True)
    rows.sort(key=lambda r: (r["atoms"], r["k"]))
    m = machine()
    section = f"""{SECTION_TITLE}

Cost of one MD step (energy + forces + stress on moved positions) with the uncertainty-aware calculator and K
posterior samples, side by side with nequip's `NequIPCalculator` on the same architecture.

- **Machine**: {m['cpu']}, {m['nproc']} cores, torch {m['torch']} (CPU, {torch.get_num_threads()} intra-op
  thread(s): `OMP_NUM_THREADS=1`, the cores are shared with other jobs), nequip {m['nequip']}, e3nn {m['e3nn']},
  vesin {m['vesin']}, Python {m['python']}; load average (1 / 5 / 15 min) {load_start} at the start,
  {load_end} after the timings{' (other jobs were running: timings are upper bounds)' if busy else ''}.
  **No GPU** was available: the GPU targets were not measured.
- **Date**: {datetime.date.today().isoformat()}; **command**: `OMP_NUM_THREADS=1 python scripts/bench_calculator.py
  {' '.join(argv or sys.argv[1:])}` ({time.perf_counter() - started:.0f} s in all).
- **Model**: bench_model.py's (`r_max` 5 Å, 3 interaction blocks, `l_max` 1, 32 features, 165k parameters),
  float64, eval mode. Full posterior: K independently initialised models (every parameter stochastic).
  Partial: the same trunk, K different energy readouts (`stochastic: {{last_layers: 1}}`).
- **Cells**: the first bundled TiO2 frame repeated 2x1x2 (96 atoms) and 4x2x4 (768 atoms), rattled by 0.01 Å;
  edges = directed pairs within r_max. Before every call each atom moves 1e-3 Å, so ours reuses its neighbour
  list as in MD (nequip rebuilds its list at every call, as in MD).
- **Timing**: medians over rounds of one call per path (order rotating), after one warm-up call per path.
  *nequip, 1 model* is the K = 1 cost of a plain model; *loop of K* calls K nequip calculators in turn;
  *partial, batched pull-back* is our partial posterior with the K per-sample pull-backs through the trunk as
  one batched vector-Jacobian product (the GPU default) instead of one at a time (the CPU default).
- **Memory**: peak resident-set growth during one call over the resident set before it, in a fresh process per
  cell, path and K after a 24-atom warm-up call (bench_model.py's probe); it is the call's own working set.
- **MACE committee**: {mace_note(mace, args)}

{table(rows)}

† The probe read no growth: the call fitted in heap memory the probe process had freed before it (building
the K models), so the peak is not seen; the number is not the call's need.

Targets, from these numbers:

{reading(rows)}

**Why the partial posterior costs more than 1.5x one model.** Its forward pass is shared: the trunk (everything
below the sampled readout) runs once and only the readout runs K times. But each sample's forces and stress are
the gradient of that sample's energy, a different vector-Jacobian product through the same trunk, so a force
uncertainty needs K pull-backs through the trunk, and the backward pass is most of the cost of a call (the slope
above). Without forces the partial posterior's extra samples are nearly free; with exact per-sample forces the
saving is the trunk's K - 1 forward passes. On this CPU the batched pull-back (one vmapped product, the GPU
default) is slower than K single ones, which is why the CPU default is the loop; the GPU case is unmeasured.
"""
    print(section)
    update_section(args.out, SECTION_TITLE, section.removeprefix(SECTION_TITLE))


if __name__ == "__main__":
    main()
