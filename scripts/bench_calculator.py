"""Cost per MD step of the UQCalculator with K posterior samples, against nequip's own ASE calculator.

Periodic TiO2 cells (the first frame of the bundled aenet subset repeated and rattled; 96 and 768 atoms by
default) and the architecture of ``scripts/bench_model.py`` (165k parameters, float64). For each K in ``--ks``
and each cell, in one process and interleaved call by call (every call on positions moved as in MD):

- ``nequip_one``: ``nequip.integrations.ase.NequIPCalculator`` on one ``GraphModel`` whose parameters do not
  require gradients (like for like with ours, see bench_model.py), vesin neighbour list, energy+forces+stress;
- ``nequip_loop``: K such calculators (the K samples of the full posterior) called one after another;
- ``full_step``, ``partial_step``: ``UQCalculator`` on a fully Bayesian posterior of K samples (every parameter
  differs) and on a partially Bayesian one (only the energy readout differs), asked what an ASE dynamics step
  asks, ``forces`` (with it come energy, stress, ``energy_std`` and ``energies_std``: one pull-back of the
  weighted mean energy through the trunk), with ``keep_trunk_graph=False`` as ``run_md`` sets it for a step
  without an uncertainty check;
- ``full_std``, ``partial_std``: the same step followed by ``atom_force_std`` at the same positions, as
  ``run_md`` asks at an uncertainty check (K pull-backs in all: the mean's and K - 1 per-sample ones);
- ``partial_samples_loop``, ``partial_samples_batched``: per-sample forces of the partial posterior from a fresh
  evaluation, K single pull-backs one after another or one batched pull-back (``is_grads_batched``, vmap),
  on the graph the calculator built (the two ways to get exact per-sample forces, for the per-device choice).

The cost of an MD step that checks ``atom_force_std`` every n-th step (``--uq-every``, 10 by default) is
amortised from the same rounds: ((n - 1) * partial_step + partial_std) / n in each round, over one model.

One MD step costs one call on moved positions: before every call all atoms move by 1e-3 Å (random directions),
so our calculator reuses its neighbour list (skin 0.5 Å) as in MD, while nequip's rebuilds it (as it does in
MD). Every call is timed with ``time.perf_counter`` (after ``torch.cuda.synchronize`` on a GPU) after one
warm-up call per path; rounds of one call per path are repeated with the order rotating, and ratios are medians
of per-round ratios. Peak memory: the growth of the resident set's high-water mark during one call over the
resident set before it, in a fresh subprocess per cell, path and K (bench_model.py's probe; CPU only).

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_calculator.py [--ks 8] [--atoms 96 768] [--rounds 3] [--uq-every 10]
                                                         [--device cpu|cuda] [--no-memory] [--out docs/benchmarks.md]
                                                         [--report]

Prints one progress line per cell and K, writes the numbers (per cell and K: the medians in ms, the ratios of the
table, the memory probe, every round's seconds) with the date and code version to
``docs/bench_calculator_<device>.json``, and from that file its own section of ``--out`` (the CPU section, or
with ``--device cuda`` a GPU section of its own), leaving the other sections as they are. ``--report`` rewrites
the section from the JSON alone.
"""

from __future__ import annotations

import argparse
import copy
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
    provenance,
    stamped,
    update_section,
)
from _harness import reading as record_reading  # noqa: E402
from _harness import reset_peak_rss as _reset_peak_rss  # noqa: E402
from _harness import status_kib as _status_kib  # noqa: E402

SECTION_TITLE = "## Calculator cost per MD step with K samples (scripts/bench_calculator.py)"
GPU_SECTION_TITLE = "## Calculator cost per MD step with K samples on a GPU (scripts/bench_calculator.py --device cuda)"
REPEATS = {96: (2, 1, 2), 768: (4, 2, 4)}  # of the 24-atom base cell
MOVE = 1e-3  # Å, displacement of every atom before each call
PATHS = ("nequip_one", "nequip_loop", "full_step", "full_std", "partial_step", "partial_std", "partial_samples_loop",
         "partial_samples_batched")
GPU_COMMAND = (
    "**GPU**: none was available for this run. The GPU figures of issue 13 (the same paths, a full K = 8 posterior "
    "against one model, and the batched against the single pull-backs on a GPU) are measured by\n"
    "`python scripts/bench_calculator.py --device cuda --ks 8 --atoms 96 768 --rounds 5`, which writes its own "
    "section of this page; `tests/unit/test_gpu.py` and the CUDA test of `tests/unit/test_calculator.py` check "
    "the CUDA path against the CPU (skipped without CUDA).")
MEMORY_PATHS = ("nequip_one", "full_step", "partial_step", "partial_std")
#: the ratios of the table and the reading, (path, reference): medians of the per-round ratios; ``amortised`` is
#: the partial step with ``atom_force_std`` every ``--uq-every``-th step
RATIOS = (("full_step", "nequip_loop"), ("full_step", "nequip_one"), ("partial_step", "nequip_one"),
          ("amortised", "nequip_one"), ("partial_std", "nequip_one"), ("partial_samples_loop", "nequip_one"),
          ("partial_samples_batched", "nequip_one"), ("partial_samples_batched", "partial_samples_loop"))


def results_path(device: str) -> Path:
    """The JSON of this benchmark's numbers on ``device`` (cpu or cuda)."""
    return REPO / "docs" / f"bench_calculator_{device}.json"


class Setup:
    """The calculators of one K: K full samples, K partial samples, and nequip on the same weights."""

    def __init__(self, k: int, device: str = "cpu"):
        import torch
        from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
        from nequip.integrations.ase import NequIPCalculator

        from mlip_uq import UQCalculator
        from mlip_uq.inference.priors import select_stochastic
        from mlip_uq.model import ModelConfig, build_model
        from mlip_uq.posterior import Posterior

        self.device = torch.device(device)
        self.config = model_config("float64")
        models = [build_model(ModelConfig.from_dict({**self.config.to_dict(), "seed": s})).eval() for s in range(k)]
        sds = [m.state_dict() for m in models]
        heads = select_stochastic(models[0], {"last_layers": 1})
        partial = [dict(sds[0], **{n: sd[n] for n in heads}) for sd in sds]
        self.full = UQCalculator(Posterior.from_state_dicts(self.config, sds), device=device)
        self.partial = UQCalculator(Posterior.from_state_dicts(self.config, partial, stochastic=heads), device=device)
        transforms = [ChemicalSpeciesToAtomTypeMapper(model_type_names=self.config.type_names),
                      NeighborListTransform(r_max=self.config.r_max, backend="vesin")]
        self.nequip = [NequIPCalculator(copy.deepcopy(m).requires_grad_(False).to(self.device), device=device,
                                        transforms=transforms) for m in models]

    def call(self, path: str, atoms) -> None:
        import torch
        from ase.calculators.calculator import all_changes

        from mlip_uq.posterior.predict import SamplePass, predictive_moments
        from mlip_uq.result_keys import ATOM_FORCE_STD, FORCES

        if path == "nequip_one":
            self.nequip[0].calculate(atoms, ["energy", "forces", "stress"], all_changes)
        elif path == "nequip_loop":
            for calc in self.nequip:
                calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
        elif path.startswith("partial_samples"):
            calc = self.partial
            evaluation = SamplePass(calc.posterior, calc.graph(atoms))
            predictive_moments(evaluation.predictions(per_sample=True, batched=path.endswith("batched")))
        else:
            kind, asked = path.split("_")
            calc = getattr(self, kind)
            calc.keep_trunk_graph = asked == "std"  # as run_md sets it: kept only for a step that checks
            calc.calculate(atoms, [FORCES], all_changes)  # what an ASE dynamics step asks
            if asked == "std":
                calc.get_property(ATOM_FORCE_STD)  # what run_md asks at an uncertainty check
        if self.device.type == "cuda":
            torch.cuda.synchronize()


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


def amortised(times: Dict[str, List[float]], every: int) -> List[float]:
    """Per-round cost of a partial-posterior MD step with ``atom_force_std`` at every ``every``-th step (s)."""
    return [((every - 1) * a + b) / every for a, b in zip(times["partial_step"], times["partial_std"])]


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


def figures(times: Dict[str, List[float]], every: int) -> Dict:
    """What the table and the reading show of one cell and K: the median ms of every path and the ``RATIOS``
    (keys ``path/reference``)."""
    with_amortised = {**times, "amortised": amortised(times, every)}
    return {"ms": {p: 1e3 * statistics.median(times[p]) for p in PATHS},
            "ratios": {f"{a}/{b}": ratio(with_amortised, a, b) for a, b in RATIOS}}


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


def table(rows: List[Dict], every: int) -> str:
    head = (
        "| atoms | edges | K | nequip 1 model ms | nequip loop of K ms | full step ms | full step / loop of K "
        "| full step / 1 model | full + atom_force_std ms | partial step ms | **partial step / 1 model** "
        f"| **partial, atom_force_std every {every}th step / 1 model** | partial + atom_force_std ms "
        "| **partial + atom_force_std / 1 model** | per-sample forces: K single / 1 batched pull-back ms "
        "| MACE committee of K ms (1 model) | peak ΔRSS MiB nequip 1 / full step / partial step / partial + std "
        "| rounds |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        ms, x = r["ms"], r["ratios"]
        mem = " / ".join(_mib(r["memory"].get(p)) for p in MEMORY_PATHS) if r["memory"] else "–"
        mace = f"{fmt(r['mace'][0])} ({fmt(r['mace'][1])})" if r.get("mace") else "–"
        lines.append(
            f"| {r['atoms']:,} | {r['edges']:,} | {r['k']} | {fmt(ms['nequip_one'])} | {fmt(ms['nequip_loop'])} "
            f"| {fmt(ms['full_step'])} | {x['full_step/nequip_loop']:.2f}x "
            f"| {x['full_step/nequip_one']:.2f}x | {fmt(ms['full_std'])} | {fmt(ms['partial_step'])} "
            f"| **{x['partial_step/nequip_one']:.2f}x** | **{x['amortised/nequip_one']:.2f}x** "
            f"| {fmt(ms['partial_std'])} | **{x['partial_std/nequip_one']:.2f}x** "
            f"| {fmt(ms['partial_samples_loop'])} / {fmt(ms['partial_samples_batched'])} "
            f"| {mace} | {mem} | {r['rounds']} |"
        )
    return "\n".join(lines)


def _met(value: float, target: float) -> str:
    return f"{value:.2f}x (target <= {target:g}x: {'met' if value <= target else 'not met'})"


def reading(rows: List[Dict], every: int, device: str) -> str:
    """The issue's targets at K = 8 against the numbers, and the per-device pull-back choice."""
    lines = []
    for r in rows:
        if r["k"] != 8:
            continue
        x = r["ratios"]
        lines.append(
            f"{r['atoms']} atoms, K = 8: partial MD step (energy, mean forces, energy std) "
            f"{_met(x['partial_step/nequip_one'], 1.15)} one model; with `atom_force_std` every {every}th "
            f"step {_met(x['amortised/nequip_one'], 1.6)}; with `atom_force_std` at every step "
            f"{x['partial_std/nequip_one']:.2f}x (5.12x / 5.90x at 96 / 768 atoms before); full posterior "
            f"step {_met(x['full_step/nequip_loop'], 1.0)} a loop of 8 nequip calls"
            + (f", {_met(x['full_step/nequip_one'], 2.0)} one model on this GPU" if device == "cuda" else "")
            + f"; per-sample forces from K single pull-backs {x['partial_samples_loop/nequip_one']:.2f}x, "
            f"from one batched pull-back {x['partial_samples_batched/nequip_one']:.2f}x one model "
            f"(batched / single {x['partial_samples_batched/partial_samples_loop']:.2f}x).")
    return "\n".join(f"- {line}" for line in lines)


def mace_note(record: Dict) -> str:
    mace = record["mace"]
    if not mace["given"]:
        return "not measured (no Python with mace-torch given: `--mace-python`)."
    if mace["result"] is None:
        return "the MACE run failed (see the script's output); not measured."
    return (f"mace-torch's `MACECalculator(models=[...])` (it evaluates the K models one after another) on K randomly "
            f"initialised `ScaleShiftMACE` models (2 interactions, hidden 32x0e+32x1o, max_ell 3, correlation 3, "
            f"r_max 5 Å, {mace['result']['params']:,} parameters, float64), in its own venv (mace-torch pins e3nn "
            f"0.4.4, run with `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` because e3nn 0.4.4 reads its bundled constants "
            f"with `torch.load`), on the {mace['atoms']}-atom cell only, {record['rounds']} rounds; a different "
            f"architecture, so compare how its cost grows with K rather than its absolute cost. In brackets: one MACE "
            f"model.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[8], help="numbers of samples K")
    parser.add_argument("--atoms", type=int, nargs="+", default=[96, 768], choices=sorted(REPEATS))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cell and K")
    parser.add_argument("--uq-every", type=int, default=10, help="amortise atom_force_std over this many steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--mace-python", help="a Python with mace-torch (e.g. /tmp/mace_venv/bin/python): also time "
                        "MACE committees of the same K on the --mace-atoms cell")
    parser.add_argument("--mace-atoms", type=int, default=96, choices=sorted(REPEATS))
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--mace-probe", help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true",
                        help="rewrite the section from docs/bench_calculator_<device>.json alone")
    args = parser.parse_args(argv)
    path = results_path(args.device)
    if args.report:
        record = json.loads(path.read_text())
        update_section(args.out, GPU_SECTION_TITLE if record["gpu"] else SECTION_TITLE, report(record, path))
        return
    if args.mace_probe:
        n_atoms, ks, rounds = args.mace_probe.split(":")
        print(json.dumps(mace_probe(int(n_atoms), [int(k) for k in ks.split(",")], int(rounds))))
        return
    import torch
    from nequip.utils.global_state import set_global_state

    from mlip_uq.files import write_json

    set_global_state()
    if args.memory_probe:
        path, n_atoms, k = args.memory_probe.split(":")
        print(json.dumps({"peak_mib": memory_probe(path, int(n_atoms), int(k))}))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    record = measure(args, argv)
    write_json(record, path)
    section = report(record, path)
    print(section)
    update_section(args.out, GPU_SECTION_TITLE if record["gpu"] else SECTION_TITLE, section)


def measure(args, argv) -> Dict:
    """Time every path for every K and cell (and probe the memory, and MACE when asked): the record."""
    import torch

    started, load_start = time.perf_counter(), load_average()
    rows = []
    for k in args.ks:
        setup = Setup(k, args.device)
        for n_atoms in args.atoms:
            times = time_cell(setup, n_atoms, args.rounds)
            graph = setup.full.graph(make_cell(REPEATS[n_atoms]))
            rows.append({"atoms": n_atoms, "k": k, "edges": int(graph["edge_index"].shape[1]),
                         "rounds": args.rounds, **figures(times, args.uq_every), "memory": {}, "mace": None,
                         "times_s": times})
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
    if not args.no_memory and args.device == "cpu":
        for row in rows:
            for path in MEMORY_PATHS:
                row["memory"][path] = measure_memory(path, row["atoms"], row["k"])
            print(f"[{time.perf_counter() - started:6.0f} s] memory {row['atoms']} atoms, K={row['k']}: "
                  f"{row['memory']}", flush=True)
    rows.sort(key=lambda r: (r["atoms"], r["k"]))
    return stamped({
        "command": "OMP_NUM_THREADS=1 python scripts/bench_calculator.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine(), "threads": torch.get_num_threads(), "load_start": load_start, "load_end": load_end,
        "busy": busy, "seconds": time.perf_counter() - started, "uq_every": args.uq_every, "rounds": args.rounds,
        "gpu": f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if args.device == "cuda" else None,
        "mace": {"given": bool(args.mace_python), "atoms": args.mace_atoms, "result": mace}, "rows": rows})


def report(record: Dict, path: Path) -> str:
    """The section's body (below its title) from the record alone; the hand-written reading of the runs (the
    record's ``reading``, :func:`_harness.reading`) closes it."""
    m, gpu, every = record["machine"], record["gpu"], record["uq_every"]
    hardware = (f"**GPU** {gpu}; host {m['cpu']}, {m['nproc']} cores" if gpu else
                f"{m['cpu']}, {m['nproc']} cores, CPU with {record['threads']} intra-op thread(s) "
                f"(`OMP_NUM_THREADS=1`, the cores are shared with other jobs)")
    gpu_note = "" if gpu else GPU_COMMAND + "\n\n"
    return f"""Cost of one MD step with the uncertainty-aware calculator and K posterior samples, side by side with nequip's
`NequIPCalculator` on the same architecture, in one run.

- **Machine**: {hardware}, torch {m['torch']}, nequip {m['nequip']}, e3nn {m['e3nn']}, vesin {m['vesin']},
  Python {m['python']}; load average (1 / 5 / 15 min) {record['load_start']} at the start, {record['load_end']}
  after the timings{' (other jobs were running: timings are upper bounds)' if record['busy'] else ''}.
- **Date**: {record['date']}; **command**: `{record['command']}` ({record['seconds']:.0f} s in all).
- **Model**: bench_model.py's (`r_max` 5 Å, 3 interaction blocks, `l_max` 1, 32 features, 165k parameters),
  float64, eval mode. Full posterior: K independently initialised models (every parameter stochastic).
  Partial: the same trunk, K different energy readouts (`stochastic: {{last_layers: 1}}`).
- **Cells**: the first bundled TiO2 frame repeated 2x1x2 (96 atoms) and 4x2x4 (768 atoms), rattled by 0.01 Å;
  edges = directed pairs within r_max. Before every call each atom moves 1e-3 Å, so ours reuses its neighbour
  list as in MD (nequip rebuilds its list at every call, as in MD).
- **Paths** (the script's docstring): *step* = what an ASE dynamics step asks, `forces` (energy, mean forces,
  stress, `energy_std`, `energies_std` come with it; one pull-back of the weighted mean energy; the trunk's
  graph freed with it, as `run_md` sets `keep_trunk_graph` between checks); *+ atom_force_std*
  = the step followed by `atom_force_std` at the same positions, as `run_md` asks at an uncertainty check (K
  pull-backs in all); *every {every}th step* = ((n - 1) step + (step + atom_force_std)) / n per round, n =
  {every}; *per-sample forces* = a fresh evaluation of the partial posterior with K single pull-backs or
  one batched (`is_grads_batched`) pull-back.
- **Timing**: one warm-up call per path, then rounds of one call per path (order rotating); ms are medians over
  rounds, ratios medians of per-round ratios.
- **Memory**: peak resident-set growth during one call over the resident set before it, in a fresh process per
  cell, path and K after a 24-atom warm-up call (bench_model.py's probe); CPU runs only.
- **MACE committee**: {mace_note(record)}

{table(record['rows'], every)}

{provenance(record, path)}

† The probe read no growth: the call fitted in heap memory the probe process had freed before it (building
the K models), so the peak is not seen; the number is not the call's need.

Targets of issue 13, from these numbers:

{reading(record['rows'], every, 'cuda' if gpu else 'cpu')}

**What each step computes.** `UQCalculator` computes what ASE asks (`mlip_uq/calculator.py`): an ASE dynamics
step asks only for `forces`, which for a shared-trunk posterior is the trunk once, the K tails, and one
pull-back of the weighted mean energy (forces and stress of the mean); `energy_std` and `energies_std` come from
the K tail energies at no extra pull-back. Per-sample forces (`forces_std`, `atom_force_std`, their epistemic
parts, `stress_std`, `forces_samples`) need one pull-back through the trunk per sample, because each sample's
forces are a different vector-Jacobian product through it; asked after the step at the same positions they cost
K - 1 more (the last sample's gradient follows from the mean's and the others'), so a step with `atom_force_std`
costs what the all-at-once evaluation did before. Keeping the trunk's graph for that later request costs
memory during the step's backward pass (measured 1.20x against 0.91x one model at 768 atoms, K = 8, in a
separate run), so `run_md` keeps it only before the steps that check (`UQCalculator.keep_trunk_graph`). For a
full posterior the trunk is only the parameter-free edge
encoding, so every sample pays its own forward and backward pass whatever is asked.

**Which signal each rule reads** (`mlip_uq/md.py`): `run_md(..., uq_every=n)` / `mlip-uq md --uq-every n`
logs the energy std and the largest and mean per-atom energy std (`energies_std`) at every step, and computes
`atom_force_std` at steps 0, n, 2n, ... only; the stop rule (`--max-force-std`, `ForceStdRule`) and the
active-learning trigger read the latest such check (`consecutive` counts checks). The trajectory does not depend
on n, so the run stops at the first multiple of n at which the every-step run's rule would fire (tested).

**Per-device choice of the per-sample pull-back**: K single pull-backs on the retained trunk graph on a CPU
(the batched product measured slower above and needs K times the memory), one batched product
(`is_grads_batched`) on CUDA{' (measured in this section)' if gpu else ' (not yet measured on a GPU)'}.

{gpu_note}{record_reading(record, path)}
"""


if __name__ == "__main__":
    main()
