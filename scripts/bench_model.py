"""Cost of one energy + forces + stress call: mlip_uq's path against nequip's own ASE calculator.

Periodic TiO2 cells of 24 to 3,000 atoms (the first frame of the bundled aenet subset, repeated and rattled)
go through, in the same process and interleaved call by call:

- **ours**: ``atoms_to_graph(atoms, type_names, r_max)`` (vesin neighbour list) followed by
  ``predict_samples(posterior, graph)`` for a K = 1 posterior made with ``Posterior.from_state_dicts``;
  the neighbour-list step and the model step are timed separately;
- **nequip (vesin)**: ``nequip.integrations.ase.NequIPCalculator.calculate`` on the same ``GraphModel``
  (built by ``build_model``), with the same vesin neighbour list; its model step (``call_model``) is timed too;
- **nequip (matscipy)**: the same calculator with nequip's default neighbour-list backend, matscipy.

Each call is timed with ``time.perf_counter``; after two warm-up calls per path, rounds of one call per path
are repeated (the order of the paths rotates from round to round), the table holds medians, and the ratio
ours / nequip is the median of the per-round ratios (so drifts of the machine's speed cancel). Peak memory
is the growth of the resident set's high-water mark (``VmHWM``, the counter behind ``ru_maxrss``) during one
call, measured in a fresh subprocess per size and path after a 24-atom warm-up call and a reset of the mark.
torch runs on one thread unless ``--threads`` says otherwise (see its help).

Usage::

    python scripts/bench_model.py [--max-atoms N] [--repeats R] [--threads T] [--no-memory] [--out FILE]

Prints one progress line per size and a markdown table, and writes (or replaces) its own section of the
``--out`` file, leaving the other sections as they are.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_FILE = REPO / "data" / "tio2_aenet_subset_1000.extxyz"
SECTION_TITLE = "## Model cost per energy+forces call (scripts/bench_model.py)"

# repeats of the 24-atom base cell (5.93 x 9.30 x 4.65 Å) for ~24 ... 3,000 atoms, kept roughly cubic
REPEATS = [(1, 1, 1), (2, 1, 2), (2, 2, 2), (2, 2, 4), (4, 2, 4), (4, 4, 4), (5, 5, 5)]
FLOAT32_ATOMS = (192, 1536)  # sizes also timed with a float32 model
FIT_MIN_ATOMS = 96  # the scaling exponent is fitted over cells of at least this many atoms
RATTLE_STDEV = 0.01  # Å
WARMUP_CALLS = 2
PATH_BUDGET_S = 60.0  # rough wall time per size for the timed rounds; bounds the rounds for large cells
MIN_ROUNDS = 3

PATHS = ("ours", "nequip_vesin", "nequip_matscipy")


def model_config(dtype: str):
    """The benchmarked architecture: a representative TiO2 model (about 120k parameters)."""
    from mlip_uq.model import ModelConfig

    return ModelConfig(
        type_names=["O", "Ti"],
        r_max=5.0,
        num_layers=3,
        l_max=1,
        num_features=32,
        avg_num_neighbors=50.0,  # ≈ the mean number of neighbours within 5 Å in these cells
        energy_shifts={"O": -432.5, "Ti": -1604.6},  # eV, close to the aenet set's per-element energies
        dtype=dtype,
    )


def make_cell(reps, seed: int = 0):
    """The first bundled TiO2 frame (24 atoms) repeated ``reps`` times and rattled by ``RATTLE_STDEV`` Å."""
    import ase.io

    base = ase.io.read(DATA_FILE, index=0)
    base.calc = None
    atoms = base.repeat(reps)
    atoms.rattle(stdev=RATTLE_STDEV, seed=seed)
    return atoms


class Runner:
    """The three ways of computing energy, forces and stress of one cell with one architecture."""

    def __init__(self, dtype: str):
        from ase.calculators.calculator import all_changes
        from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
        from nequip.integrations.ase import NequIPCalculator

        from mlip_uq.data.graph import atoms_to_graph
        from mlip_uq.model import build_model
        from mlip_uq.posterior import Posterior
        from mlip_uq.posterior.predict import predict_samples

        self.config = model_config(dtype)
        model = build_model(self.config).eval()
        self.posterior = Posterior.from_state_dicts(self.config, [model.state_dict()])
        self.posterior.model()  # build once, outside the timings
        self._atoms_to_graph = atoms_to_graph
        self._predict_samples = predict_samples
        self._all_changes = all_changes
        self.calcs = {}
        for backend in ("vesin", "matscipy"):
            calc = NequIPCalculator(
                model,
                device="cpu",
                transforms=[
                    ChemicalSpeciesToAtomTypeMapper(model_type_names=self.config.type_names),
                    NeighborListTransform(r_max=self.config.r_max, backend=backend),
                ],
            )
            calc.call_model = self._timed_call_model(calc)
            self.calcs[f"nequip_{backend}"] = calc

    @staticmethod
    def _timed_call_model(calc) -> Callable:
        """Wrap the calculator's model step to record its duration (instance attribute; nequip untouched)."""
        inner = calc.call_model

        def call_model(data):
            t0 = time.perf_counter()
            out = inner(data)
            calc.last_model_s = time.perf_counter() - t0
            return out

        return call_model

    def ours(self, atoms) -> Dict[str, float]:
        t0 = time.perf_counter()
        graph = self._atoms_to_graph(atoms, self.config.type_names, self.config.r_max)
        t1 = time.perf_counter()
        pred = self._predict_samples(self.posterior, graph)
        t2 = time.perf_counter()
        self.last_ours = (graph, pred)
        return {"total": t2 - t0, "nl": t1 - t0, "model": t2 - t1}

    def nequip(self, path: str, atoms) -> Dict[str, float]:
        calc = self.calcs[path]
        t0 = time.perf_counter()
        calc.calculate(atoms, ["energy", "forces", "stress"], self._all_changes)
        t1 = time.perf_counter()
        return {"total": t1 - t0, "model": calc.last_model_s}

    def call(self, path: str, atoms) -> Dict[str, float]:
        return self.ours(atoms) if path == "ours" else self.nequip(path, atoms)


@dataclass
class SizeResult:
    atoms: int
    edges: int
    dtype: str
    rounds: int
    times: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)  # path -> part -> seconds
    ratios: List[float] = field(default_factory=list)  # per round: ours / nequip_vesin
    max_force_diff: float = 0.0  # eV/Å between ours and nequip_vesin
    energy_diff: float = 0.0  # eV
    peak_mib: Dict[str, float] = field(default_factory=dict)

    def ms(self, path: str, part: str = "total") -> float:
        return 1e3 * statistics.median(self.times[path][part])

    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def ratio_iqr(self) -> tuple[float, float]:
        q = np.percentile(self.ratios, [25, 75])
        return float(q[0]), float(q[1])


def time_size(runner: Runner, reps, dtype: str, max_repeats: int) -> SizeResult:
    atoms = make_cell(reps)
    for _ in range(WARMUP_CALLS):
        t0 = time.perf_counter()
        for path in PATHS:
            runner.call(path, atoms)
        per_round = time.perf_counter() - t0
    # timed rounds: as many as fit in PATH_BUDGET_S (estimated from the last warm-up round), within
    # [MIN_ROUNDS, max_repeats]; the order of the paths rotates so that no path always runs first
    n_rounds = int(min(max_repeats, max(MIN_ROUNDS, PATH_BUDGET_S // max(per_round, 1e-9))))
    times: Dict[str, Dict[str, List[float]]] = {p: {} for p in PATHS}
    ratios = []
    for r in range(n_rounds):
        order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]
        this_round = {path: runner.call(path, atoms) for path in order}
        for path, parts in this_round.items():
            for part, seconds in parts.items():
                times[path].setdefault(part, []).append(seconds)
        ratios.append(this_round["ours"]["total"] / this_round["nequip_vesin"]["total"])
    # agreement check on the last calls: same parameters, same neighbour list -> the same numbers
    graph, pred = runner.last_ours
    results = runner.calcs["nequip_vesin"].results
    return SizeResult(
        atoms=len(atoms),
        edges=int(graph["edge_index"].shape[1]),
        dtype=dtype,
        rounds=n_rounds,
        times=times,
        ratios=ratios,
        max_force_diff=float(np.abs(pred.forces[0].numpy() - results["forces"]).max()),
        energy_diff=float(abs(pred.energy[0, 0].item() - float(results["energy"]))),
    )


def _status_kib(key: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (``VmRSS``: resident set now, ``VmHWM``: its peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS mark ``VmHWM`` to the current RSS (write 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(path: str, reps, dtype: str) -> float:
    """Peak resident-set growth (MiB) during one call over the resting state before it (this process).

    After building the model and one 24-atom warm-up call, the kernel's peak-RSS mark is reset to the current
    RSS, so that the peak after the call (``VmHWM``) minus the RSS before it (``VmRSS``) is the call's own
    peak working set. ``getrusage(RUSAGE_SELF).ru_maxrss`` cannot be used after such a reset: the kernel
    folds in the peak recorded whenever a thread exits, which here is the peak of the imports and model
    build. Without /proc, the ``ru_maxrss`` delta is returned, which reads 0 when the call needs less.
    """
    runner = Runner(dtype)
    runner.call(path, make_cell((1, 1, 1)))
    atoms = make_cell(reps)
    gc.collect()
    if _reset_peak_rss() and _status_kib("VmHWM") is not None:
        before = _status_kib("VmRSS")
        runner.call(path, atoms)
        after = _status_kib("VmHWM")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runner.call(path, atoms)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0  # both in KiB on Linux


def measure_memory(path: str, reps, dtype: str, threads: int) -> Optional[float]:
    spec = f"{path}:{'x'.join(map(str, reps))}:{dtype}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", spec, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        print(f"  memory probe {spec} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


def fit_exponent(results: List[SizeResult], path: str, part: str = "total") -> float:
    points = [(r.atoms, r.ms(path, part)) for r in results if r.atoms >= FIT_MIN_ATOMS]
    if len(points) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def machine() -> Dict[str, str]:
    import e3nn
    import nequip
    import torch
    import vesin

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    return {
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nequip": nequip.__version__,
        "e3nn": e3nn.__version__,
        "vesin": getattr(vesin, "__version__", "?"),
        "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def fmt(x: Optional[float], digits: int = 1) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:,.{digits}f}"


def table(results: List[SizeResult]) -> str:
    head = (
        "| atoms | edges | dtype | ours ms | nequip ms (vesin) | ratio ours/nequip (IQR) | nequip ms (matscipy) "
        "| ours NL ms | ours model ms | nequip model ms | peak ΔRSS ours / nequip MiB | rounds |\n"
        "|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for r in results:
        lo, hi = r.ratio_iqr()
        mem = (
            f"{fmt(r.peak_mib.get('ours'), 0)} / {fmt(r.peak_mib.get('nequip_vesin'), 0)}" if r.peak_mib else "–"
        )
        rows.append(
            f"| {r.atoms:,} | {r.edges:,} | {r.dtype} | {fmt(r.ms('ours'))} | {fmt(r.ms('nequip_vesin'))} "
            f"| {r.ratio():.3f} ({lo:.2f}–{hi:.2f}) | {fmt(r.ms('nequip_matscipy'))} | {fmt(r.ms('ours', 'nl'))} "
            f"| {fmt(r.ms('ours', 'model'))} | {fmt(r.ms('nequip_vesin', 'model'))} | {mem} | {r.rounds} |"
        )
    return "\n".join([head, *rows])


def reading(results: List[SizeResult], exps: Dict[str, float]) -> str:
    """A plain-words summary generated from the numbers (so that a re-run keeps it true)."""
    f64 = [r for r in results if r.dtype == "float64"]
    ratios = [r.ratio() for r in f64]
    gmean = float(np.exp(np.mean(np.log(ratios))))
    worst = max(f64, key=lambda r: r.ratio())
    best = min(f64, key=lambda r: r.ratio())
    inside = [r for r in f64 if r.ratio_iqr()[0] <= 1.0 <= r.ratio_iqr()[1]]
    nl_share = [r.ms("ours", "nl") / r.ms("ours") for r in f64]
    # nequip's own data step (from_ase, type mapping, neighbour list) = its total minus its model step
    data_gap = [r.ms("ours", "nl") - (r.ms("nequip_vesin") - r.ms("nequip_vesin", "model")) for r in f64]
    model_ratio = [r.ms("ours", "model") / r.ms("nequip_vesin", "model") for r in f64]
    matscipy_extra = [r.ms("nequip_matscipy") - r.ms("nequip_vesin") for r in f64]
    big = f64[-1]
    if abs(gmean - 1) < 0.02:
        verdict = f"mlip_uq's path costs the same as nequip's own calculator (geometric-mean ratio {gmean:.3f})"
    elif gmean > 1:
        verdict = (
            f"mlip_uq's path is {100 * (gmean - 1):.1f}% slower than nequip's own calculator "
            f"(geometric-mean ratio {gmean:.3f})"
        )
    else:
        verdict = (
            f"mlip_uq's path is {100 * (1 - gmean):.1f}% faster than nequip's own calculator "
            f"(geometric-mean ratio {gmean:.3f})"
        )
    noise = (
        "in every size the interquartile range of the per-round ratios contains 1, i.e. the difference is "
        "inside the run-to-run noise of this machine"
        if len(inside) == len(f64)
        else f"for {len(inside)} of {len(f64)} sizes the interquartile range of the per-round ratios contains "
        "1 (inside this machine's run-to-run noise)"
    )
    text = (
        f"{verdict}: the per-size ratio runs from {best.ratio():.3f} ({best.atoms:,} atoms) to "
        f"{worst.ratio():.3f} ({worst.atoms:,} atoms), and {noise}. Both paths run the same nequip model on "
        f"the same vesin neighbour list (energies agree to {max(r.energy_diff for r in f64):.1e} eV and forces "
        f"to {max(r.max_force_diff for r in f64):.1e} eV/Å); they differ only in how the graph dict is built "
        f"(ours also checks the frame and casts dtypes) and in that ours calls the model through "
        f"`torch.func.functional_call` with the sample's parameters. Our model step takes "
        f"{min(model_ratio):.2f}–{max(model_ratio):.2f}x the time of nequip's, and our graph building "
        f"{min(data_gap):+.1f} to {max(data_gap):+.1f} ms per call against nequip's. Nearly all of the time "
        f"is the model's forward and backward pass: building the graph with its neighbour list is "
        f"{100 * min(nl_share):.1f}–{100 * max(nl_share):.1f}% of a call. nequip's default matscipy "
        f"neighbour list changes its calculator's time by {min(matscipy_extra):+.0f} to "
        f"{max(matscipy_extra):+.0f} ms per call against vesin (at {big.atoms:,} atoms "
        f"{matscipy_extra[-1]:+.0f} ms). The cost grows as N^{exps['ours']:.2f} (ours) and "
        f"N^{exps['nequip_vesin']:.2f} (nequip) from {FIT_MIN_ATOMS} atoms up; at {big.atoms:,} atoms one "
        f"call takes {big.ms('ours') / 1e3:.2f} s ({1e3 * big.ms('ours') / big.atoms:.0f} µs per atom)."
    )
    if exps["ours"] > 1.1:
        text += (
            " The number of edges per atom is fixed, so the above-linear exponent means that the per-edge "
            "work gets slower per edge on bigger graphs (the (edges x features) tensors of the "
            "convolutions and their gradients outgrowing the caches), not that the neighbour list scales badly."
        )
    pairs = []
    for r in (x for x in results if x.dtype == "float32"):
        r64 = next((x for x in f64 if x.atoms == r.atoms), None)
        if r64 is not None:
            pairs.append((r, r64))
    if pairs:
        speed = ", ".join(f"{r64.ms('ours') / r.ms('ours'):.2f}x at {r.atoms:,} atoms" for r, r64 in pairs)
        ratio32 = ", ".join(f"{r.ratio():.3f}" for r, _ in pairs)
        text += f" A float32 model runs {speed} faster than float64 on our path (ours/nequip ratio {ratio32})."
    return text


def write_section(out: Path, section: str) -> None:
    """Replace this script's section of ``out`` (from its title to the next ``## `` title), or append it."""
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION_TITLE), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((j for j in range(start + 1, len(lines)) if re.match(r"^## ", lines[j])), len(lines))
        new_lines = lines[:start] + section.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
        new = "\n".join(new_lines + lines[end:]).rstrip("\n") + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(new)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-atoms", type=int, default=3000, help="largest cell (atoms); default 3000")
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed rounds per size, at most (large cells get fewer, >= 3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a small shared machine, multi-threaded torch spin-waits "
        "whenever another job holds a core, which swamps the comparison; 0: torch's default, all cores)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: path:AxBxC:dtype
    args = parser.parse_args(argv)

    import torch
    from nequip.utils.global_state import set_global_state

    set_global_state()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.memory_probe:
        path, reps, dtype = args.memory_probe.split(":")
        peak = memory_probe(path, tuple(int(x) for x in reps.split("x")), dtype)
        print(json.dumps({"peak_mib": peak}))
        return

    info = machine()
    threads = torch.get_num_threads()
    started = time.perf_counter()
    sizes = [reps for reps in REPEATS if 24 * int(np.prod(reps)) <= args.max_atoms]
    plan = [(reps, "float64") for reps in sizes]
    plan += [(reps, "float32") for reps in sizes if 24 * int(np.prod(reps)) in FLOAT32_ATOMS]
    print(
        f"{info['cpu']}, {info['nproc']} cores, torch {info['torch']} ({threads} threads), nequip {info['nequip']}"
    )
    runners = {}
    results: List[SizeResult] = []
    for reps, dtype in plan:
        if dtype not in runners:
            runners[dtype] = Runner(dtype)
        r = time_size(runners[dtype], reps, dtype, args.repeats)
        results.append(r)
        print(
            f"{r.atoms:6d} atoms {r.edges:8d} edges {dtype}: ours {r.ms('ours'):9.1f} ms "
            f"(NL {r.ms('ours', 'nl'):6.1f}, model {r.ms('ours', 'model'):9.1f}) | nequip vesin "
            f"{r.ms('nequip_vesin'):9.1f} ms, matscipy {r.ms('nequip_matscipy'):9.1f} ms | ratio "
            f"{r.ratio():.3f} | {r.rounds} rounds | {time.perf_counter() - started:5.0f} s",
            flush=True,
        )
    del runners
    gc.collect()
    if not args.no_memory:
        for r, (reps, dtype) in zip(results, plan):
            if dtype != "float64":
                continue
            for path in ("ours", "nequip_vesin"):
                r.peak_mib[path] = measure_memory(path, reps, dtype, threads)
            print(
                f"{r.atoms:6d} atoms: peak ΔRSS ours {fmt(r.peak_mib['ours'], 0)} MiB, nequip "
                f"{fmt(r.peak_mib['nequip_vesin'], 0)} MiB | {time.perf_counter() - started:5.0f} s",
                flush=True,
            )

    exps = {p: fit_exponent([r for r in results if r.dtype == "float64"], p) for p in PATHS}
    exp_model = fit_exponent([r for r in results if r.dtype == "float64"], "ours", "model")
    md_table = table(results)
    print()
    print(md_table)
    print(
        f"\nscaling exponent (time ∝ N^p, cells >= {FIT_MIN_ATOMS} atoms, float64): ours {exps['ours']:.2f}, "
        f"nequip vesin {exps['nequip_vesin']:.2f}, nequip matscipy {exps['nequip_matscipy']:.2f}, "
        f"ours model step {exp_model:.2f}"
    )
    command = "python scripts/bench_model.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    cfg = model_config("float64")
    max_atoms = max(r.atoms for r in results)
    section = f"""{SECTION_TITLE}

Wall time of one energy + forces + stress call for periodic TiO2 cells, mlip_uq's path
(`atoms_to_graph` with the vesin neighbour list, then `predict_samples` on a K = 1 posterior) side by side
with nequip's own `NequIPCalculator` wrapping the same `GraphModel`, in one process, calls interleaved.

- **Machine**: {info['cpu']}, {info['nproc']} cores, torch {info['torch']} (CPU, {threads} intra-op threads),
  nequip {info['nequip']}, e3nn {info['e3nn']}, vesin {info['vesin']}, Python {info['python']};
  load average (1 / 5 / 15 min) at the start {info['load']}.
- **Date**: {datetime.date.today().isoformat()}; **command**: `{command}` ({time.perf_counter() - started:.0f} s).
- **Model**: `build_model(ModelConfig(type_names=["O", "Ti"], r_max={cfg.r_max}, num_layers={cfg.num_layers},
  l_max={cfg.l_max}, num_features={cfg.num_features}, avg_num_neighbors={cfg.avg_num_neighbors}, energy_shifts=...))`,
  float64 unless marked, eval mode; `nequip.utils.global_state.set_global_state()` first.
- **Cells**: the first frame of `data/tio2_aenet_subset_1000.extxyz` (24 atoms), `atoms.repeat(...)` up to
  {max_atoms:,} atoms, rattled by {RATTLE_STDEV} Å; edges = directed pairs within r_max.
- **Timing**: `time.perf_counter`, {WARMUP_CALLS} warm-up calls per path, then rounds of one call per path
  (order rotating); medians over the rounds. *ratio* = median over rounds of ours / nequip (vesin), with the
  interquartile range of the per-round ratios. *ours NL* = `atoms_to_graph` (frame checks, `from_ase`, type
  mapping, vesin neighbour list, dtype cast); *ours model* = `predict_samples`; *nequip model* = the
  calculator's `call_model`. nequip is called as `calc.calculate(atoms, ["energy", "forces", "stress"],
  all_changes)`, with `NeighborListTransform(backend="vesin")`, and with its default backend matscipy.
- **Memory**: peak ΔRSS = peak resident set during one call minus the resident set just before it, in a
  fresh subprocess per size and path, after a 24-atom warm-up call there: the kernel's peak mark is reset
  (`5` written to `/proc/self/clear_refs`), then `VmHWM` after the call minus `VmRSS` before it (from
  `/proc/self/status`; the same counter as `ru_maxrss`, which cannot be reset). This is the call's own
  peak working set (edge tensors, autograd graph, neighbour list), not the few hundred MiB of the imported
  libraries and the model.

{md_table}

Scaling exponent (log-log least-squares fit of time against atoms, cells ≥ {FIT_MIN_ATOMS} atoms, float64):
**ours {exps['ours']:.2f}**, nequip (vesin) {exps['nequip_vesin']:.2f}, nequip (matscipy)
{exps['nequip_matscipy']:.2f}; ours model step alone {exp_model:.2f}.

{reading(results, exps)}
"""
    write_section(args.out, section)
    print(f"\nwrote the section to {args.out}")


if __name__ == "__main__":
    main()
