"""Seconds per neighbour list: vesin (what the package builds its graphs with, ``mlip_uq.data.neighbor_pairs``)
against ASE's ``ase.neighborlist.neighbor_list``, side by side in one run; written to docs/benchmarks.md.

Both build the full list (i, j, cell shift, distance) of the same rattled TiO2 cells (the first bundled frame
repeated, ``_harness.make_cell``) at the same cutoff, periodic in all three directions; the pair counts are
checked equal before anything is timed. Rounds rotate the order of the two; each timing is the median of
``--repeats`` calls, and the ratio reported per size is the median over rounds of ASE / vesin.

    OMP_NUM_THREADS=1 python scripts/bench_neighbors.py [--rounds 5] [--repeats 5] [--cutoff 5.0] [--report]

The numbers go with the date and code version to ``docs/bench_neighbors.json``; the section of
docs/benchmarks.md is written from that file (``--report``: from the JSON alone). The README's figure for
vesin is checked against it (tests/unit/test_readme_figures.py).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from _harness import load_average, machine, make_cell, provenance, reading, rotating_rounds, stamped, update_section

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Neighbour lists: vesin against ASE (scripts/bench_neighbors.py)"
OUT = ROOT / "docs" / "bench_neighbors.json"
PAGE = ROOT / "docs" / "benchmarks.md"
REPS = [(1, 1, 1), (2, 2, 1), (2, 2, 2), (4, 4, 2)]  # 24, 96, 192, 768 atoms
LIBRARIES = ("vesin", "ase")


def _calls(cutoff: float):
    """One neighbour-list call per library: the arrays (i, j, S, d) of the full list."""
    from ase.neighborlist import neighbor_list

    from mlip_uq.data import neighbor_pairs

    return {"vesin": lambda atoms: neighbor_pairs(atoms, cutoff, "ijSd"),
            "ase": lambda atoms: neighbor_list("ijSd", atoms, cutoff)}


def measure(rounds: int, repeats: int, cutoff: float) -> dict:
    calls = _calls(cutoff)
    rows = []
    for reps in REPS:
        atoms = make_cell(reps)
        pairs = {name: len(call(atoms)[0]) for name, call in calls.items()}
        if len(set(pairs.values())) != 1:
            raise RuntimeError(f"{len(atoms)} atoms: the libraries disagree on the pair count {pairs}")

        def timed(name: str) -> float:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                calls[name](atoms)
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        timings = list(rotating_rounds(LIBRARIES, timed, rounds))
        ratios = [t["ase"] / t["vesin"] for t in timings]
        rows.append({"atoms": len(atoms), "pairs": pairs["vesin"],
                     **{f"{name}_ms": 1000 * statistics.median(t[name] for t in timings) for name in LIBRARIES},
                     "ase_per_vesin": statistics.median(ratios),
                     "ase_per_vesin_range": [min(ratios), max(ratios)]})
        print(f"{len(atoms)} atoms: ASE / vesin {rows[-1]['ase_per_vesin']:.1f}x", flush=True)
    import ase

    return stamped({"command": f"OMP_NUM_THREADS=1 python scripts/bench_neighbors.py --rounds {rounds} "
                               f"--repeats {repeats} --cutoff {cutoff}",
                    "machine": machine(), "ase": ase.__version__, "load_average": load_average(),
                    "cutoff_A": cutoff, "rounds": rounds, "repeats": repeats, "rows": rows})


def report(record: dict, path: Path = OUT) -> str:
    """The section's body from the record alone."""
    m = record["machine"]
    lines = [
        f"{record['date']}, {m['cpu']}, {m['nproc']} cores, Python {m['python']}, vesin {m['vesin']}, ASE "
        f"{record['ase']}; load average at the end {record['load_average']}. Command: `{record['command']}`. The "
        f"full list (i, j, cell shift, distance) of rattled TiO2 cells at {record['cutoff_A']} Å, periodic; the "
        f"median of {record['repeats']} calls per round, {record['rounds']} rounds in rotating order; the ratio is "
        "the median over rounds (range in brackets).",
        "",
        "| atoms | pairs | vesin ms | ASE ms | ASE / vesin |",
        "|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        low, high = r["ase_per_vesin_range"]
        lines.append(f"| {r['atoms']:,} | {r['pairs']:,} | {r['vesin_ms']:.2f} | {r['ase_ms']:.2f} | "
                     f"**{r['ase_per_vesin']:.1f}x** ({low:.1f}–{high:.1f}) |")
    lines += ["", provenance(record, path), "", reading(record, path)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cutoff", type=float, default=5.0, help="Å (the benchmarked model's r_max)")
    parser.add_argument("--report", action="store_true", help="write the section from the JSON only")
    args = parser.parse_args()
    if args.report:
        record = json.loads(OUT.read_text())
    else:
        from mlip_uq.files import write_json

        record = measure(args.rounds, args.repeats, args.cutoff)
        write_json(record, OUT)
    update_section(PAGE, HEADING, report(record))
    print(f"{OUT}\n{PAGE}: {HEADING}")


if __name__ == "__main__":
    main()
