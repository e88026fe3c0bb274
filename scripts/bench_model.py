"""Cost of one energy + forces + stress call: mlip_uq's path against nequip's own ASE calculator.

Periodic TiO2 cells of 24 to 3,000 atoms (the first frame of the bundled aenet subset, repeated and rattled)
go through, in the same process and interleaved call by call:

- **ours**: ``collate([atoms_to_graph(atoms, type_names, r_max)])`` (vesin neighbour list; the batch of one
  the calculator builds) followed by ``predict_samples(posterior, batch)`` for a K = 1 posterior made with
  ``Posterior.from_state_dicts``; the graph step (frame checks, ``from_ase``, type mapping, neighbour list,
  batch) and the model step are timed separately;
- **nequip (vesin)**: ``nequip.integrations.ase.NequIPCalculator.calculate`` on the ``GraphModel`` that
  ``build_model`` returned, with the same vesin neighbour list; its model step (``call_model``) is timed too,
  the rest of the call is its data step;
- **nequip (frozen)**: the same calculator and neighbour list on a copy of the model whose parameters do not
  require gradients, as ours (whose sample tensors are plain tensors) and as a compiled nequip model;
- **nequip (matscipy)**: the same calculator with nequip's default neighbour-list backend, matscipy.

Each call is timed with ``time.perf_counter``; after two warm-up calls per path, rounds of one call per path
are repeated (the order of the paths rotates from round to round), the table holds medians, and a ratio
ours / nequip is the median of the per-round ratios (so drifts of the machine's speed cancel). Peak memory
is the growth of the resident set's high-water mark (``VmHWM``, the counter behind ``ru_maxrss``) during one
call, measured in a fresh subprocess per size and path after a 24-atom warm-up call and a reset of the mark.
Two cells are also run in a subprocess with ``THP_MEM_ALLOC_ENABLE=1`` (torch's CPU allocator then asks for
transparent huge pages), because page faults on fresh allocations dominate the large cells otherwise.
torch runs on one thread unless ``--threads`` says otherwise (see its help).

Usage::

    python scripts/bench_model.py [--max-atoms N] [--repeats R] [--threads T] [--no-memory] [--no-thp]
                                  [--out FILE] [--report]

Prints one progress line per size and a markdown table, writes the numbers (per size and variant: the medians
in ms, the ratios with their interquartile ranges, memory, page faults; and every round's seconds) with the date
and code version to ``docs/bench_model.json``, and from that file its own section of the ``--out`` file, leaving
the other sections as they are. ``--report`` rewrites the section from the JSON alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from _harness import (
    MODEL,
    RATTLE_STDEV,
    REPO,
    fmt,
    load_average,
    machine,
    machine_busy,
    make_cell,
    model_config,
    peak_rss_growth_mib,
    provenance,
    rotating_rounds,
    stamped,
    update_section,
)
from _harness import reading as record_reading

SECTION_TITLE = "## Model cost per energy+forces call (scripts/bench_model.py)"

# repeats of the 24-atom base cell (5.93 x 9.30 x 4.65 Å) for 24 ... 3,000 atoms, kept roughly cubic
REPEATS = [(1, 1, 1), (2, 1, 2), (2, 2, 2), (2, 2, 4), (4, 2, 4), (4, 4, 4), (5, 5, 5)]
FLOAT32_ATOMS = (192, 1536)  # sizes also timed with a float32 model
THP_ATOMS = (768, 3000)  # sizes also timed with THP_MEM_ALLOC_ENABLE=1 (float64)
FIT_MIN_ATOMS = 96  # the scaling exponent is fitted over cells of at least this many atoms
WARMUP_CALLS = 2
PATH_BUDGET_S = 45.0  # rough wall time per size for the timed rounds; bounds the rounds of large cells
MIN_ROUNDS = 3

PATHS = ("ours", "nequip_vesin", "nequip_frozen", "nequip_matscipy")
REFERENCES = ("nequip_vesin", "nequip_frozen")  # the paths ours is compared with, round by round


def n_atoms(reps) -> int:
    return 24 * int(np.prod(reps))


class Runner:
    """The four ways of computing energy, forces and stress of one cell with one architecture."""

    def __init__(self, dtype: str):
        from ase.calculators.calculator import all_changes
        from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
        from nequip.integrations.ase import NequIPCalculator

        from mlip_uq.data import collate
        from mlip_uq.data.graph import atoms_to_graph
        from mlip_uq.model import build_model
        from mlip_uq.posterior import Posterior
        from mlip_uq.posterior.predict import predict_samples

        self.config = model_config(dtype)
        model = build_model(self.config).eval()
        self.posterior = Posterior.from_state_dicts(self.config, [model.state_dict()])
        self.posterior.model()  # built once, outside the timings
        self._atoms_to_graph = lambda atoms, type_names, r_max: collate([atoms_to_graph(atoms, type_names, r_max)])
        self._predict_samples = predict_samples
        self._all_changes = all_changes
        self.last_ours = None
        # the same parameters, not requiring gradients (autograd then saves nothing for weight gradients)
        frozen = copy.deepcopy(model).requires_grad_(False)
        self.calcs = {}
        for name, graph_model, backend in (
            ("nequip_vesin", model, "vesin"),
            ("nequip_frozen", frozen, "vesin"),
            ("nequip_matscipy", model, "matscipy"),
        ):
            calc = NequIPCalculator(
                graph_model,
                device="cpu",
                transforms=[
                    ChemicalSpeciesToAtomTypeMapper(model_type_names=self.config.type_names),
                    NeighborListTransform(r_max=self.config.r_max, backend=backend),
                ],
            )
            calc.call_model = self._timed_call_model(calc)
            self.calcs[name] = calc

    @staticmethod
    def _timed_call_model(calc) -> Callable:
        """Wrap the calculator's model step to record its duration (an instance attribute; nequip untouched)."""
        inner = calc.call_model

        def call_model(data):
            t0 = time.perf_counter()
            out = inner(data)
            calc.last_model_s = time.perf_counter() - t0
            return out

        return call_model

    def ours(self, atoms) -> Dict[str, float]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        graph = self._atoms_to_graph(atoms, self.config.type_names, self.config.r_max)
        t1 = time.perf_counter()
        pred = self._predict_samples(self.posterior, graph)
        t2 = time.perf_counter()
        self.last_ours = (graph, pred)
        self.last_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return {"total": t2 - t0, "data": t1 - t0, "model": t2 - t1}

    def nequip(self, path: str, atoms) -> Dict[str, float]:
        calc = self.calcs[path]
        t0 = time.perf_counter()
        calc.calculate(atoms, ["energy", "forces", "stress"], self._all_changes)
        total = time.perf_counter() - t0
        return {"total": total, "data": total - calc.last_model_s, "model": calc.last_model_s}

    def call(self, path: str, atoms) -> Dict[str, float]:
        return self.ours(atoms) if path == "ours" else self.nequip(path, atoms)


@dataclass
class SizeResult:
    """Timings of one cell with one model variant (``float64``, ``float32`` or ``float64 THP``), every round."""

    atoms: int
    edges: int
    variant: str
    rounds: int
    times: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)  # path -> part -> seconds per round
    ratios: Dict[str, List[float]] = field(default_factory=dict)  # reference -> per round: ours / reference
    max_force_diff: float = 0.0  # eV/Å, ours against the nequip paths on vesin
    energy_diff: float = 0.0  # eV, ours against the nequip paths on vesin
    peak_mib: Dict[str, Optional[float]] = field(default_factory=dict)
    ours_faults: float = 0.0  # median minor page faults per call of ours

    def summary(self) -> Dict:
        """What the table and the reading show of this cell: medians (ms) of every path and part, the median
        and interquartile range of the per-round ratios, the agreement, memory and page faults."""
        return {"atoms": self.atoms, "edges": self.edges, "variant": self.variant, "rounds": self.rounds,
                "ms": {path: {part: 1e3 * statistics.median(seconds) for part, seconds in parts.items()}
                       for path, parts in self.times.items()},
                "ratio": {ref: statistics.median(values) for ref, values in self.ratios.items()},
                "ratio_iqr": {ref: [float(q) for q in np.percentile(values, [25, 75])]
                              for ref, values in self.ratios.items()},
                "max_force_diff": self.max_force_diff, "energy_diff": self.energy_diff, "peak_mib": self.peak_mib,
                "ours_faults": self.ours_faults}


class Row:
    """One cell's figures (a :meth:`SizeResult.summary`, e.g. read back from docs/bench_model.json)."""

    def __init__(self, figures: Dict):
        self.figures = figures
        for key in ("atoms", "edges", "variant", "rounds", "max_force_diff", "energy_diff", "peak_mib",
                    "ours_faults"):
            setattr(self, key, figures[key])

    def ms(self, path: str, part: str = "total") -> float:
        return self.figures["ms"][path][part]

    def ratio(self, reference: str = "nequip_vesin") -> float:
        return self.figures["ratio"][reference]

    def ratio_iqr(self, reference: str = "nequip_vesin") -> Tuple[float, float]:
        lo, hi = self.figures["ratio_iqr"][reference]
        return lo, hi

    def ratio_cell(self, reference: str) -> str:
        lo, hi = self.ratio_iqr(reference)
        return f"{self.ratio(reference):.3f} ({lo:.2f}–{hi:.2f})"

    def within_noise(self, reference: str) -> bool:
        lo, hi = self.ratio_iqr(reference)
        return lo <= 1.0 <= hi


def time_size(runner: Runner, reps, variant: str, max_repeats: int) -> SizeResult:
    atoms = make_cell(reps)
    for _ in range(WARMUP_CALLS):
        t0 = time.perf_counter()
        for path in PATHS:
            runner.call(path, atoms)
        per_round = time.perf_counter() - t0
    # as many rounds as fit in PATH_BUDGET_S (estimated from the last warm-up round), within
    # [MIN_ROUNDS, max_repeats]; the order of the paths rotates so that no path always runs first
    n_rounds = int(min(max_repeats, max(MIN_ROUNDS, PATH_BUDGET_S // max(per_round, 1e-9))))
    times: Dict[str, Dict[str, List[float]]] = {p: {} for p in PATHS}
    ratios: Dict[str, List[float]] = {ref: [] for ref in REFERENCES}
    faults = []
    for this_round in rotating_rounds(PATHS, lambda path: runner.call(path, atoms), n_rounds):
        for path, parts in this_round.items():
            for part, seconds in parts.items():
                times[path].setdefault(part, []).append(seconds)
        for ref in REFERENCES:
            ratios[ref].append(this_round["ours"]["total"] / this_round[ref]["total"])
        faults.append(runner.last_faults)
    # agreement check on the last calls: same parameters and neighbour list, so the same numbers
    graph, pred = runner.last_ours
    forces = np.stack([runner.calcs[ref].results["forces"] for ref in REFERENCES])
    energies = np.array([float(runner.calcs[ref].results["energy"]) for ref in REFERENCES])
    return SizeResult(
        atoms=len(atoms),
        edges=int(graph["edge_index"].shape[1]),
        variant=variant,
        rounds=n_rounds,
        times=times,
        ratios=ratios,
        max_force_diff=float(np.abs(pred.forces[0].numpy() - forces).max()),
        energy_diff=float(np.abs(pred.energy[0, 0].item() - energies).max()),
        ours_faults=float(statistics.median(faults)),
    )


def progress(result: SizeResult, started: float) -> None:
    r = Row(result.summary())
    print(
        f"{r.atoms:6d} atoms {r.edges:8d} edges {r.variant:11s}: ours {r.ms('ours'):8.1f} ms "
        f"(data {r.ms('ours', 'data'):5.1f}, model {r.ms('ours', 'model'):8.1f}) | nequip vesin "
        f"{r.ms('nequip_vesin'):8.1f} ms, frozen {r.ms('nequip_frozen'):8.1f} ms, matscipy "
        f"{r.ms('nequip_matscipy'):8.1f} ms | ratio {r.ratio():.3f}, to frozen {r.ratio('nequip_frozen'):.3f} | "
        f"{r.rounds:2d} rounds | {time.perf_counter() - started:4.0f} s",
        flush=True,
    )


def _self_command(*args: str) -> List[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


def run_thp(sizes, max_repeats: int, threads: int, started: float) -> List[SizeResult]:
    """Time ``sizes`` (float64) in a subprocess whose torch allocator uses transparent huge pages.

    ``THP_MEM_ALLOC_ENABLE`` is read once by torch's CPU allocator, so it has to be set before the process
    starts; it takes effect where ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` or ``always``.
    """
    spec = ",".join("x".join(map(str, reps)) for reps in sizes)
    cmd = _self_command("--thp-probe", spec, "--repeats", str(max_repeats), "--threads", str(threads))
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
    )
    if proc.returncode != 0:
        print(f"THP run failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return []
    results = [SizeResult(**values) for values in _last_json(proc.stdout)]
    for r in results:
        progress(r, started)
    return results


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
    return peak_rss_growth_mib(lambda: runner.call(path, atoms))


def measure_memory(path: str, reps, dtype: str, threads: int) -> Optional[float]:
    spec = f"{path}:{'x'.join(map(str, reps))}:{dtype}"
    proc = subprocess.run(
        _self_command("--memory-probe", spec, "--threads", str(threads)), capture_output=True, text=True, cwd=REPO
    )
    if proc.returncode != 0:
        print(f"memory probe {spec} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(_last_json(proc.stdout)["peak_mib"])


def fit_exponent(results: List[Row], path: str, part: str = "total") -> float:
    """Slope of log(time) against log(atoms), least squares over cells of at least FIT_MIN_ATOMS atoms."""
    points = [(r.atoms, r.ms(path, part)) for r in results if r.atoms >= FIT_MIN_ATOMS]
    if len(points) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def table(results: List[Row]) -> str:
    head = (
        "| atoms | edges | variant | ours ms | nequip ms | ratio ours/nequip (IQR) | nequip frozen ms "
        "| ratio ours/frozen (IQR) | nequip matscipy ms | ours data ms | nequip data ms (vesin / matscipy) "
        "| ours model ms | nequip model ms (default / frozen) | peak ΔRSS MiB ours / nequip / frozen | rounds |\n"
        "|---:|---:|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for r in results:
        mem = " / ".join(fmt(r.peak_mib.get(p), 0) for p in ("ours", *REFERENCES)) if r.peak_mib else "–"
        rows.append(
            f"| {r.atoms:,} | {r.edges:,} | {r.variant} | {fmt(r.ms('ours'))} | {fmt(r.ms('nequip_vesin'))} "
            f"| {r.ratio_cell('nequip_vesin')} | {fmt(r.ms('nequip_frozen'))} | {r.ratio_cell('nequip_frozen')} "
            f"| {fmt(r.ms('nequip_matscipy'))} | {fmt(r.ms('ours', 'data'))} "
            f"| {fmt(r.ms('nequip_vesin', 'data'))} / {fmt(r.ms('nequip_matscipy', 'data'))} "
            f"| {fmt(r.ms('ours', 'model'))} | {fmt(r.ms('nequip_vesin', 'model'))} / "
            f"{fmt(r.ms('nequip_frozen', 'model'))} | {mem} | {r.rounds} |"
        )
    return "\n".join([head, *rows])


def _gmean(values) -> float:
    return float(np.exp(np.mean(np.log(list(values)))))


def reading(results: List[Row], exps: Dict[str, float], load_end: str, busy: bool) -> str:
    """A plain-words summary generated from the numbers, so that a re-run keeps it true."""
    f64 = [r for r in results if r.variant == "float64"]
    small, big = f64[0], f64[-1]
    g_frozen = _gmean(r.ratio("nequip_frozen") for r in f64)
    g_default = _gmean(r.ratio("nequip_vesin") for r in f64)
    lo = min(f64, key=lambda r: r.ratio("nequip_frozen"))
    hi = max(f64, key=lambda r: r.ratio("nequip_frozen"))
    inside = sum(r.within_noise("nequip_frozen") for r in f64)
    data_share = [r.ms("ours", "data") / r.ms("ours") for r in f64]
    data_gap = [r.ms("ours", "data") - r.ms("nequip_vesin", "data") for r in f64]
    matscipy_gap = [r.ms("nequip_matscipy", "data") - r.ms("nequip_vesin", "data") for r in f64]
    shared = "cores shared with other jobs; " if busy else ""
    memory = (
        f" ({fmt(big.peak_mib['nequip_vesin'], 0)} MiB against {fmt(big.peak_mib['nequip_frozen'], 0)} MiB "
        f"frozen and {fmt(big.peak_mib['ours'], 0)} MiB ours at {big.atoms:,} atoms)"
        if big.peak_mib
        else ""
    )
    if g_frozen <= 1.02 or inside >= len(f64) - 1:
        verdict = "Within this machine's noise, mlip_uq's path adds no overhead over nequip's own calculator"
    else:
        verdict = f"mlip_uq's path is {100 * (g_frozen - 1):.1f}% slower than nequip's own calculator"
    text = (
        f"{verdict}. Like for like (nequip's calculator on the same model with frozen parameters, as ours "
        f"runs it) the geometric mean of the per-size ratios is {g_frozen:.3f}, from "
        f"{lo.ratio('nequip_frozen'):.3f} ({lo.atoms:,} atoms) to {hi.ratio('nequip_frozen'):.3f} "
        f"({hi.atoms:,} atoms), and for {inside} of {len(f64)} sizes the interquartile range of the per-round "
        f"ratios contains 1; single calls scatter by 10–20% here ({shared}load average {load_end} at the end "
        f"of the timings)."
    )
    s_lo, _ = small.ratio_iqr("nequip_frozen")
    if s_lo > 1.0:
        excess = small.ratio("nequip_frozen") - 1
        text += (
            f" The one systematic difference is at the smallest cell ({small.atoms} atoms): ours takes "
            f"{100 * excess:+.1f}% (about {excess * small.ms('nequip_frozen'):+.1f} ms per call), the fixed cost of "
            f"`torch.func.functional_call` swapping the sample's tensors in, which disappears in the noise from "
            f"~100 atoms up."
        )
    text += (
        f" Against the calculator as a user would set it up from an eager model (parameters requiring "
        f"gradients) the geometric-mean ratio is {g_default:.3f}, and {big.ratio('nequip_vesin'):.3f} at "
        f"{big.atoms:,} atoms: with parameters that require gradients autograd keeps, in every layer, the "
        f"inputs it would need for the weight gradients, although only forces and stress are asked for, so "
        f"that call needs more memory{memory} and takes more page faults; ours swaps in the sample's plain "
        f"tensors and avoids this. All paths run the same nequip model on the same vesin neighbour list (energies "
        f"agree to {max(r.energy_diff for r in f64):.1e} eV, forces to {max(r.max_force_diff for r in f64):.1e} "
        f"eV/Å)."
    )
    if max(data_gap) < 0:
        gap = f"is {-max(data_gap):.1f}–{-min(data_gap):.1f} ms per call cheaper than the calculator's"
    else:
        gap = f"costs {min(data_gap):+.1f} to {max(data_gap):+.1f} ms per call against the calculator's"
    text += (
        f" Our data step (frame checks, `from_ase`, type mapping, vesin neighbour list) {gap} (`from_ase`, "
        f"transforms, `atoms.copy()`, results to numpy) and is {100 * min(data_share):.1f}–"
        f"{100 * max(data_share):.1f}% of a call: nearly all of the time is the model's forward and backward "
        f"pass. nequip's default matscipy neighbour list costs {min(matscipy_gap):+.1f} to "
        f"{max(matscipy_gap):+.1f} ms per call more than vesin, small next to the model. The cost grows as "
        f"N^{exps['ours']:.2f} (ours) and N^{exps['nequip_frozen']:.2f} (nequip frozen) from {FIT_MIN_ATOMS} "
        f"atoms up; at {big.atoms:,} atoms one call takes {big.ms('ours') / 1e3:.2f} s "
        f"({1e3 * big.ms('ours') / big.atoms:.0f} µs per atom)."
    )
    thp = {r.atoms: r for r in results if r.variant == "float64 THP"}
    plain = {r.atoms: r for r in f64}
    both = sorted(set(thp) & set(plain))
    if both:
        speed = ", ".join(
            f"{plain[n].ms('ours') / thp[n].ms('ours'):.2f}x faster at {n:,} atoms "
            f"({plain[n].ms('ours') / 1e3:.2f} s → {thp[n].ms('ours') / 1e3:.2f} s)"
            for n in both
        )
        lead = (
            " The number of edges per atom is fixed, so the above-linear growth is not in the model's "
            "arithmetic; most of it is page faults"
            if exps["ours"] > 1.05
            else " Large cells pay for page faults"
        )
        text += (
            f"{lead}: tensors above glibc's mmap threshold (at most 32 MiB) are "
            "fresh zero-filled 4 KiB pages at every allocation, and more of them cross it as the cell grows "
            f"({big.ours_faults:,.0f} minor page faults per call at {big.atoms:,} atoms, "
            f"{small.ours_faults:,.0f} at {small.atoms}). With `THP_MEM_ALLOC_ENABLE=1` (torch's CPU allocator "
            f"then uses transparent huge pages; {', '.join(f'{thp[n].ours_faults:,.0f}' for n in both)} faults) "
            f"our call is {speed}, for every path alike "
            f"(ours/frozen ratio {', '.join(thp[n].ratio_cell('nequip_frozen') for n in both)})"
        )
        if len(both) >= 2:
            a, b = both[0], both[-1]
            p_thp = np.log(thp[b].ms("ours") / thp[a].ms("ours")) / np.log(b / a)
            p_plain = np.log(plain[b].ms("ours") / plain[a].ms("ours")) / np.log(b / a)
            text += f"; from {a:,} to {b:,} atoms the cost then grows as N^{p_thp:.2f} instead of N^{p_plain:.2f}"
        text += "."
    pairs = [(r, plain[r.atoms]) for r in results if r.variant == "float32" and r.atoms in plain]
    if pairs:
        speed = " and ".join(f"{r64.ms('ours') / r.ms('ours'):.2f}x ({r.atoms:,} atoms)" for r, r64 in pairs)
        ratio32 = ", ".join(f"{r.ratio('nequip_frozen'):.3f}" for r, _ in pairs)
        text += f" A float32 model is {speed} faster than float64 on our path (ours/frozen ratio {ratio32})."
    return text


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
    parser.add_argument("--no-thp", action="store_true", help="skip the run with THP_MEM_ALLOC_ENABLE=1")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: path:AxBxC:dtype
    parser.add_argument("--thp-probe", help=argparse.SUPPRESS)  # internal: AxBxC,AxBxC,...
    parser.add_argument("--report", action="store_true", help="rewrite the section from docs/bench_model.json alone")
    args = parser.parse_args(argv)

    import torch
    from nequip.utils.global_state import set_global_state

    set_global_state()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.memory_probe:
        path, reps, dtype = args.memory_probe.split(":")
        print(json.dumps({"peak_mib": memory_probe(path, tuple(int(x) for x in reps.split("x")), dtype)}))
        return
    if args.thp_probe:
        runner = Runner("float64")
        sizes = [tuple(int(x) for x in s.split("x")) for s in args.thp_probe.split(",")]
        results = [time_size(runner, reps, "float64 THP", args.repeats) for reps in sizes]
        print(json.dumps([dataclasses.asdict(r) for r in results]))
        return

    path = REPO / "docs" / "bench_model.json"
    if args.report:
        record = json.loads(path.read_text())
    else:
        from mlip_uq.files import write_json

        record = measure(args, argv)
        write_json(record, path)
    update_section(args.out, SECTION_TITLE, report(record, path))
    print(f"\nwrote the section to {args.out}")


def measure(args, argv) -> Dict:
    """Time every size and variant (and probe the memory): the record."""
    import torch

    info = machine()
    load_start = load_average()
    threads = torch.get_num_threads()
    started = time.perf_counter()
    sizes = [reps for reps in REPEATS if n_atoms(reps) <= args.max_atoms]
    plan = [(reps, "float64") for reps in sizes] + [
        (reps, "float32") for reps in sizes if n_atoms(reps) in FLOAT32_ATOMS
    ]
    print(f"{info['cpu']}, {info['nproc']} cores, torch {info['torch']} ({threads} threads), nequip {info['nequip']}")
    runners: Dict[str, Runner] = {}
    results: List[SizeResult] = []
    for reps, dtype in plan:
        if dtype not in runners:
            runners[dtype] = Runner(dtype)
        results.append(time_size(runners[dtype], reps, dtype, args.repeats))
        progress(results[-1], started)
    del runners
    gc.collect()
    thp_sizes = [reps for reps in sizes if n_atoms(reps) in THP_ATOMS]
    if not args.no_thp and thp_sizes:
        results += run_thp(thp_sizes, args.repeats, threads, started)
    load_end, busy = load_average(), machine_busy(threads)
    if not args.no_memory:
        for r, reps in zip(results, sizes):  # the float64 rows come first, one per size
            for path in ("ours", *REFERENCES):
                r.peak_mib[path] = measure_memory(path, reps, "float64", threads)
            print(
                f"{r.atoms:6d} atoms: peak ΔRSS ours {fmt(r.peak_mib['ours'], 0)} MiB, nequip "
                f"{fmt(r.peak_mib['nequip_vesin'], 0)} MiB, frozen {fmt(r.peak_mib['nequip_frozen'], 0)} MiB | "
                f"{time.perf_counter() - started:4.0f} s",
                flush=True,
            )
    rows = [Row(r.summary()) for r in results]
    f64 = [r for r in rows if r.variant == "float64"]
    exponents = {**{p: fit_exponent(f64, p) for p in PATHS}, "ours_model": fit_exponent(f64, "ours", "model")}
    print()
    print(table(rows))
    print(
        f"\nscaling exponent (time ∝ N^p, cells >= {FIT_MIN_ATOMS} atoms, float64): ours {exponents['ours']:.2f}, "
        f"nequip vesin {exponents['nequip_vesin']:.2f}, frozen {exponents['nequip_frozen']:.2f}, "
        f"matscipy {exponents['nequip_matscipy']:.2f}, ours model step {exponents['ours_model']:.2f}"
    )
    return stamped({
        "command": " ".join(["python scripts/bench_model.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info, "threads": threads, "load_start": load_start, "load_end": load_end, "busy": busy,
        "seconds": time.perf_counter() - started, "exponents": exponents, "rows": [r.figures for r in rows],
        "times_s": [dataclasses.asdict(r) for r in results]})


def report(record: Dict, path: Path) -> str:
    """The section's body (below its title) from the record alone. Its closing reading is generated from the
    numbers, unless the record holds one (``reading``, :func:`_harness.reading`): the committed record is the
    published table transcribed, rounded as shown, and the reading generated from those rounded figures differs
    in two of them from the one the full-precision run gave, which is kept as it stood."""
    info, threads, exps = record["machine"], record["threads"], record["exponents"]
    rows = [Row(figures) for figures in record["rows"]]
    cfg = MODEL
    return f"""{provenance(record, path)}

Wall time of one energy + forces + stress call for periodic TiO2 cells: mlip_uq's path
(`atoms_to_graph` with the vesin neighbour list, `collate` into a batch of one as the calculator does, then
`predict_samples` on a K = 1 posterior) side by side
with nequip's own `NequIPCalculator` wrapping the same `GraphModel`, in one process, calls interleaved.

- **Machine**: {info["cpu"]}, {info["nproc"]} cores, torch {info["torch"]} (CPU, {threads} intra-op thread(s)),
  nequip {info["nequip"]}, e3nn {info["e3nn"]}, vesin {info["vesin"]}, Python {info["python"]}; transparent
  huge pages `{info["thp"]}`; load average (1 / 5 / 15 min) {record["load_start"]} at the start, {record["load_end"]} after the
  timings.
- **Date**: {record["date"]}; **command**: `{record["command"]}`
  ({record["seconds"]:.0f} s in all).
- **Model**: `build_model(ModelConfig(type_names=["O", "Ti"], r_max={cfg['r_max']}, num_layers={cfg['num_layers']},
  l_max={cfg['l_max']}, num_features={cfg['num_features']}, avg_num_neighbors={cfg['avg_num_neighbors']}, energy_shifts=...))`,
  165k parameters, eval mode, float64 unless marked; `nequip.utils.global_state.set_global_state()` first.
- **Cells**: the first frame of `data/tio2_aenet_subset_1000.extxyz` (24 atoms), `atoms.repeat(...)` up to
  {max(r.atoms for r in rows):,} atoms, rattled by {RATTLE_STDEV} Å; edges = directed pairs within r_max.
- **Timing**: `time.perf_counter`, {WARMUP_CALLS} warm-up calls per path, then rounds of one call per path
  (order rotating), as many as fit in ~{PATH_BUDGET_S:.0f} s per size within [{MIN_ROUNDS}, --repeats];
  medians over the rounds. nequip is called as `calc.calculate(atoms, ["energy", "forces", "stress"],
  all_changes)` with `NeighborListTransform(backend="vesin")`: *nequip* on the model as `build_model`
  returns it (parameters require gradients), *nequip frozen* on a copy with `requires_grad_(False)` (as
  ours, whose sample tensors are plain tensors, and as a compiled nequip model), *nequip matscipy* on the
  first with nequip's default neighbour-list backend. A *ratio* is the median over rounds of ours / that
  path, with the interquartile range of the per-round ratios. *ours data* = `atoms_to_graph` and `collate` (frame
  checks, `from_ase`, type mapping, vesin neighbour list, dtype cast, batch); *ours model* = `predict_samples`; *nequip
  model* = the calculator's `call_model`, *nequip data* = the rest of its call. *float64 THP*: the same in
  a subprocess with `THP_MEM_ALLOC_ENABLE=1`.
- **Memory**: peak ΔRSS = peak resident set during one call minus the resident set just before it, in a
  fresh subprocess per size and path, after a 24-atom warm-up call there: the kernel's peak mark is reset
  (`5` written to `/proc/self/clear_refs`), then `VmHWM` after the call minus `VmRSS` before it (from
  `/proc/self/status`; the counter behind `ru_maxrss`, which itself cannot be reset). It is the call's own
  peak working set (edge tensors, autograd graph, neighbour list), not the few hundred MiB of the imported
  libraries and the model; repeated probes scatter by about ±10%, and the 24-atom row reads ~0 because the
  warm-up call is that same cell.

{table(rows)}

Scaling exponent (log-log least-squares fit of time against atoms, cells ≥ {FIT_MIN_ATOMS} atoms, float64):
**ours {exps["ours"]:.2f}**, nequip {exps["nequip_vesin"]:.2f}, nequip frozen {exps["nequip_frozen"]:.2f},
nequip matscipy {exps["nequip_matscipy"]:.2f}; ours model step alone {exps["ours_model"]:.2f}.

{record_reading(record, path, lambda: reading(rows, exps, record["load_end"], record["busy"]))}
"""


if __name__ == "__main__":
    main()
