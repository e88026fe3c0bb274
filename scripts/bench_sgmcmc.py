"""Adaptive SG-MCMC, deep ensembles, mean-field VI and MC dropout on the same data, side by side in one run.

For each data set: one SG-MCMC chain, four chains, a deep ensemble (``method: ensemble``, members trained
one after the other), mean-field VI (``method: vi``, its MAP phase included in the wall-clock) and MC dropout
(``method: dropout``) — test-set energy/force MAE, NLL, miscalibration area, Spearman of std vs error, force
sharpness and training wall-clock, every method through ``mlip_uq.train.train`` on the same split and
architecture (MC dropout adds a 16-unit readout hidden layer so that the readout has units to drop). The
target from the literature: one chain matches or beats the ensemble on NLL and miscalibration area at no more
than a third of its training cost.

    OMP_NUM_THREADS=1 python scripts/bench_sgmcmc.py --data ethanol [--cpu-budget] [--noise learned|head]
        [--methods sgmcmc ensemble vi dropout] [--out docs/benchmarks.md]

``--cpu-budget`` shrinks the model and the step counts so that a data set finishes in about an hour on 2 CPU
cores; the table states the settings that produced it. Finished runs (their ``metrics.json`` exists) are
reused, so an interrupted benchmark continues where it stopped.
"""

import argparse
import json
import logging
from datetime import date
from pathlib import Path

import torch
from nequip.utils.global_state import set_global_state

from _harness import update_section
from mlip_uq.train import train

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sgmcmc", "ensemble", "vi", "dropout")
CPU_BUDGET = {
    "model": ["model.num_layers=3", "model.l_max=1", "model.num_features=16", "model.radial_mlp_width=32"],
    "sgmcmc": ["sgmcmc.burnin_steps=3000", "sgmcmc.preheat_steps=300", "sgmcmc.n_samples=20", "sgmcmc.thinning=50"],
    # every ensemble member, VI's MAP phase and dropout training
    "training": ["training.max_epochs=300", "training.patience=40"],
    "vi": ["vi.steps=2000"],
}
TIO2_CPU = ["data.n_train=500", "data.n_test=300", "model.r_max=4.5"]


def timed_train(config, out, overrides):
    """Train (or reuse a finished run in ``out``) and return the wall-clock in seconds: from the run's
    ``config.yaml`` (written first) to its ``metrics.json`` (written last)."""
    if not (out / "metrics.json").is_file():
        train(config, out_dir=out, overrides=overrides)
    return (out / "metrics.json").stat().st_mtime - (out / "config.yaml").stat().st_mtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["ethanol", "tio2"], required=True)
    parser.add_argument("--cpu-budget", action="store_true")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--noise", choices=["learned", "head"], default="learned",
                        help="the models' observation noise: per element (default) or per atom from the noise head")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_sgmcmc")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_global_state()
    model = CPU_BUDGET["model"] + (TIO2_CPU if args.data == "tio2" else []) if args.cpu_budget else []
    model = model + [f"model.noise={args.noise}"]
    training = CPU_BUDGET["training"] if args.cpu_budget else []
    overrides = {
        "sgmcmc": model + (CPU_BUDGET["sgmcmc"] if args.cpu_budget else []),
        "ensemble": model + training + [f"ensemble.n_members={args.members}"],
        "vi": model + training + (CPU_BUDGET["vi"] if args.cpu_budget else []),
        "dropout": model + training,
    }
    variant = ("CPU budget" if args.cpu_budget else "full settings") + f", noise {args.noise}"
    runs = args.runs / args.data / variant.replace(", ", "_").replace(" ", "_")
    config = {m: ROOT / "configs" / f"{args.data}_{m}.yaml" for m in METHODS}
    rows = {}

    def run(name: str, method: str, out: Path, extra=()) -> None:
        wall = timed_train(config[method], out, overrides[method] + list(extra))
        rows[name] = dict(json.loads((out / "metrics.json").read_text()), wall_s=wall)

    if "sgmcmc" in args.methods:
        for chains in (1, 4):
            run(f"SG-MCMC, {chains} chain{'s' if chains > 1 else ''}", "sgmcmc", runs / f"sgmcmc_{chains}chain",
                [f"sgmcmc.n_chains={chains}"])
    if "ensemble" in args.methods:
        run(f"deep ensemble ({args.members} members)", "ensemble", runs / f"ensemble_{args.members}")
    if "vi" in args.methods:
        run("mean-field VI (MAP phase included)", "vi", runs / "vi")
    if "dropout" in args.methods:
        run("MC dropout", "dropout", runs / "dropout")
    (runs / "results.json").write_text(json.dumps(rows, indent=2))

    used = [m for m in METHODS if m in args.methods]
    first = next(iter(rows.values()))
    lines = [
        f"Measured {date.today().isoformat()}, 2 CPU cores, torch {torch.__version__}: "
        f"`python scripts/bench_sgmcmc.py --data {args.data}{' --cpu-budget' if args.cpu_budget else ''}"
        f" --noise {args.noise}`; configs `configs/{args.data}_<method>.yaml` with "
        "the overrides " + "; ".join(f"{m} `{' '.join(overrides[m]) or 'none'}`" for m in used) + ". "
        f"Test set: {first['n_structures']} structures. Energies in meV/atom, forces in meV/Å.",
        "",
        "| method | samples | energy MAE | force MAE | energy NLL | force NLL | energy miscal. area | force miscal. area | force Spearman | force sharpness | training wall-clock |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {m['n_samples']} | {1000 * m['energy_mae']:.2f} | {1000 * m['forces_mae']:.1f} | "
            f"{m['energy_nll']:.3f} | {m['forces_nll']:.3f} | {m['energy_miscal_area']:.3f} | "
            f"{m['forces_miscal_area']:.3f} | {m['forces_spearman']:.3f} | {1000 * m['forces_sharpness']:.1f} | "
            f"{m['wall_s'] / 60:.1f} min |"
        )
    ensemble_row = f"deep ensemble ({args.members} members)"
    if "SG-MCMC, 1 chain" in rows and ensemble_row in rows:
        one, ens = rows["SG-MCMC, 1 chain"], rows[ensemble_row]
        lines += ["", (
            f"One chain vs the ensemble: force NLL {one['forces_nll']:.3f} vs {ens['forces_nll']:.3f}, force "
            f"miscalibration area {one['forces_miscal_area']:.3f} vs {ens['forces_miscal_area']:.3f}, training cost "
            f"{one['wall_s'] / ens['wall_s']:.2f}x the ensemble's (target: better or equal on both at <= 0.33x)."
        )]
    section = "\n".join(lines + [""])
    update_section(args.out, f"## SG-MCMC, deep ensemble, VI and MC dropout: {args.data}, {variant} "
                             "(scripts/bench_sgmcmc.py)", section)
    print(section)


if __name__ == "__main__":
    main()
