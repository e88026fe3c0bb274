"""What ``make demo`` gives: its test-split metrics (MAP model, SG-MCMC posterior before and after recalibration)
and the uncertainty its MD run logs, from one run of ``make demo``; written to docs/benchmarks.md.

The script runs ``make demo DEMO_OUT=<--out>`` (the Makefile's own commands, so the figures are the demo's) and
reads what it writes: ``metrics.json`` (the MAP model on the test split, stds as fitted on the validation split),
``sgmcmc/metrics_calibrated.json`` (the K = 8 posterior on the test split, raw and after the recalibration
``mlip-uq calibrate`` fitted on the validation split) and ``md/md_log.csv`` (200 steps of Langevin MD at 300 K).

    python scripts/bench_demo.py [--out runs/bench_demo] [--report]

The numbers go with the date and code version to ``docs/bench_demo.json``; the section of docs/benchmarks.md is written
from that file (``--report``: from the JSON alone). The README's demo figures are checked against it
(tests/unit/test_readme_figures.py).
"""

import argparse
import csv
import json
import subprocess
import time
from pathlib import Path

from _harness import load_average, provenance, reading, stamped, update_section

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## `make demo`: the bundled TiO2 subset, test split (scripts/bench_demo.py)"
OUT = ROOT / "docs" / "bench_demo.json"
PAGE = ROOT / "docs" / "benchmarks.md"
METRICS = ("energy_mae", "forces_mae", "energy_nll", "forces_nll", "energy_miscal_area", "forces_miscal_area",
           "energy_spearman", "forces_spearman", "forces_sharpness")
MD_COLUMNS = ("max_atom_force_std", "max_atom_force_std_epistemic", "energy_std", "energy_std_epistemic")


def _metrics(values: dict) -> dict:
    return {k: values[k] for k in METRICS}


def measure(out: Path) -> dict:
    began = time.perf_counter()
    subprocess.run(["make", "demo", f"DEMO_OUT={out}"], cwd=ROOT, check=True)
    minutes = (time.perf_counter() - began) / 60
    map_metrics = json.loads((out / "metrics.json").read_text())
    sgmcmc = json.loads((out / "sgmcmc" / "metrics_calibrated.json").read_text())
    with open(out / "md" / "md_log.csv") as f:
        log = list(csv.DictReader(f))
    return stamped({
        "command": "python scripts/bench_demo.py (make demo)", "minutes": minutes, "load_average": load_average(),
        "test_structures": map_metrics["n_structures"], "samples": sgmcmc["n_samples"],
        "calibration": sgmcmc["calibration"],
        "rows": {"map": _metrics(map_metrics), "sgmcmc_raw": _metrics(sgmcmc["uncalibrated"]),
                 "sgmcmc_recalibrated": _metrics(sgmcmc)},
        "md": {"steps": len(log) - 1,
               **{c: [min(float(r[c]) for r in log), max(float(r[c]) for r in log)] for c in MD_COLUMNS}}})


ROW_WORDS = {"map": "MAP (noise head)", "sgmcmc_raw": "SG-MCMC, raw", "sgmcmc_recalibrated": "SG-MCMC, recal."}


def report(record: dict, path: Path = OUT) -> str:
    """The section's body from the record alone."""
    lines = [
        f"{record['date']}, 2 CPU cores, `make demo` ({record['minutes']:.1f} min; load average at the end "
        f"{record['load_average']}): a MAP model with a noise head (40 epochs, its noise stds fitted on the "
        f"validation split), then a readout-only SG-MCMC posterior of K = {record['samples']} samples, prior "
        f"centred on the MAP weights, recalibrated on the validation split ({record['calibration']}); "
        f"{record['test_structures']} test structures. Energies per atom in meV/atom, forces per component in "
        "meV/Å; raw = as the posterior file predicts, recal. = after the recalibration.",
        "",
        "| demo model | energy MAE | force MAE | energy NLL | force NLL | energy miscal. | force miscal. | "
        "energy Spearman | force Spearman | force sharpness |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, words in ROW_WORDS.items():
        m = record["rows"][name]
        lines.append(
            f"| {words} | {1000 * m['energy_mae']:.1f} | {1000 * m['forces_mae']:.1f} | {m['energy_nll']:.2f} | "
            f"{m['forces_nll']:.2f} | {m['energy_miscal_area']:.3f} | {m['forces_miscal_area']:.3f} | "
            f"{m['energy_spearman']:.2f} | {m['forces_spearman']:.2f} | {1000 * m['forces_sharpness']:.0f} |")
    md = record["md"]
    (f_lo, f_hi), (fe_lo, fe_hi) = md["max_atom_force_std"], md["max_atom_force_std_epistemic"]
    (e_lo, e_hi), (ee_lo, ee_hi) = md["energy_std"], md["energy_std_epistemic"]
    lines += [
        "",
        f"MD ({md['steps']} steps at 300 K, `md/md_log.csv`): the max per-atom force std moves between "
        f"{f_lo:.3f} and {f_hi:.3f} eV/Å (its epistemic part {fe_lo:.3f}–{fe_hi:.3f}), the energy std between "
        f"{e_lo:.2f} and {e_hi:.2f} eV (epistemic {ee_lo:.3f}–{ee_hi:.3f}).",
        "", provenance(record, path), "", reading(record, path)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_demo", help="the demo's output folder")
    parser.add_argument("--report", action="store_true", help="write the section from the JSON only")
    args = parser.parse_args()
    if args.report:
        record = json.loads(OUT.read_text())
    else:
        from mlip_uq.files import write_json

        record = measure(args.out.resolve())
        write_json(record, OUT)
    update_section(PAGE, HEADING, report(record))
    print(f"{OUT}\n{PAGE}: {HEADING}")


if __name__ == "__main__":
    main()
