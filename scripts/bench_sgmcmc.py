"""Adaptive SG-MCMC against a deep ensemble of the same architecture, side by side in one run.

For each data set: one SG-MCMC chain, four chains, and a 5-member deep ensemble (five MAP models with different
seeds, combined into one posterior) — test-set energy/force MAE, NLL, miscalibration area, Spearman of std vs
error, and training wall-clock. The target from the literature: one chain matches or beats the ensemble on NLL
and miscalibration area at no more than a third of its training cost.

    python scripts/bench_sgmcmc.py --data ethanol [--cpu-budget] [--out docs/benchmarks.md]

``--cpu-budget`` shrinks the model and the step counts so that a data set finishes in about half an hour on
2 CPU cores; the table states the settings that produced it.
"""

import argparse
import json
import logging
from datetime import date
from pathlib import Path

import torch
from nequip.utils.global_state import set_global_state

from bench_accuracy import update_section
from mlip_uq.data import FrameStore
from mlip_uq.evaluate import metrics_and_plots, predict_graphs
from mlip_uq.posterior import Posterior, load_posterior
from mlip_uq.train import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ethanol": (ROOT / "configs" / "ethanol_sgmcmc.yaml", ROOT / "configs" / "ethanol_map.yaml"),
    "tio2": (ROOT / "configs" / "tio2_sgmcmc.yaml", ROOT / "configs" / "tio2_map.yaml"),
}
CPU_BUDGET = {
    "model": ["model.num_layers=3", "model.l_max=1", "model.num_features=16", "model.radial_mlp_width=32"],
    "sgmcmc": ["sgmcmc.burnin_steps=3000", "sgmcmc.preheat_steps=300", "sgmcmc.n_samples=20", "sgmcmc.thinning=50"],
    "map": ["training.max_epochs=300", "training.patience=40"],
}
TIO2_CPU = ["data.n_train=500", "data.n_test=300", "model.r_max=4.5"]
KEYS = ["energy_mae", "forces_mae", "energy_nll", "forces_nll", "energy_miscal_area", "forces_miscal_area",
        "forces_spearman", "forces_sharpness"]


def timed_train(config, out, overrides):
    """Train (or reuse a finished run in ``out``) and return the wall-clock in seconds: from the run's
    ``config.yaml`` (written first) to its ``metrics.json`` (written last)."""
    if not (out / "metrics.json").is_file():
        train(config, out_dir=out, overrides=overrides)
    return (out / "metrics.json").stat().st_mtime - (out / "config.yaml").stat().st_mtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--cpu-budget", action="store_true")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--heteroscedastic", action="store_true",
                        help="every model gets the per-atom noise head, trained jointly (mean-variance ensemble members)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_sgmcmc")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_global_state()
    sg_config, map_config = CONFIGS[args.data]
    model = CPU_BUDGET["model"] + (TIO2_CPU if args.data == "tio2" else []) if args.cpu_budget else []
    if args.heteroscedastic:
        model = model + ["model.noise_head=true"]
    sg_over = model + (CPU_BUDGET["sgmcmc"] if args.cpu_budget else [])
    map_over = model + (CPU_BUDGET["map"] if args.cpu_budget else [])
    if args.heteroscedastic:
        sg_over += ["sgmcmc.noise.heteroscedastic=true"]
        map_over += ["training.heteroscedastic=true"]
    variant = ("CPU budget" if args.cpu_budget else "full settings") + (", noise head" if args.heteroscedastic else ", fixed noise")
    runs = args.runs / args.data / variant.replace(", ", "_").replace(" ", "_")
    rows = {}

    for chains in (1, 4):
        out = runs / f"sgmcmc_{chains}chain"
        wall = timed_train(sg_config, out, sg_over + [f"sgmcmc.n_chains={chains}"])
        rows[f"SG-MCMC, {chains} chain{'s' if chains > 1 else ''}"] = dict(
            json.loads((out / "metrics.json").read_text()), wall_s=wall)

    wall, members = 0.0, []
    for seed in range(args.members):
        out = runs / f"map_seed{seed}"
        # members differ in their initialisation only: the data split (top-level seed) is the same
        wall += timed_train(map_config, out, map_over + [f"model.seed={seed}"])
        members.append(load_posterior(out / "posterior.h5"))
    first = members[0]
    ensemble = Posterior.from_state_dicts(first.config, [m.state_dict(0) for m in members], method="ensemble",
                                          energy_references=first.energy_references,
                                          data_fingerprint=first.data_fingerprint)
    ensemble.save(runs / "ensemble_posterior.h5")
    test_graphs = _test_graphs(runs / "map_seed0")
    metrics = metrics_and_plots(predict_graphs(ensemble, test_graphs), runs / "ensemble_plots")
    rows[f"deep ensemble ({args.members} MAP members)"] = dict(metrics, wall_s=wall)
    (runs / "results.json").write_text(json.dumps(rows, indent=2))

    one, ens = rows["SG-MCMC, 1 chain"], rows[f"deep ensemble ({args.members} MAP members)"]
    lines = [
        f"Measured {date.today().isoformat()}, 2 CPU cores, torch {torch.__version__}: "
        f"`python scripts/bench_sgmcmc.py --data {args.data}{' --cpu-budget' if args.cpu_budget else ''}"
        f"{' --heteroscedastic' if args.heteroscedastic else ''}`; "
        f"overrides: SG-MCMC `{' '.join(sg_over) or 'none'}`, ensemble members `{' '.join(map_over) or 'none'}`. "
        f"Test set: {one['n_structures']} structures. Energies in meV/atom, forces in meV/Å.",
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
    verdict = (
        f"One chain vs the ensemble: force NLL {one['forces_nll']:.3f} vs {ens['forces_nll']:.3f}, force "
        f"miscalibration area {one['forces_miscal_area']:.3f} vs {ens['forces_miscal_area']:.3f}, training cost "
        f"{one['wall_s'] / ens['wall_s']:.2f}x the ensemble's (target: better or equal on both at <= 0.33x)."
    )
    lines += ["", verdict, ""]
    section = "\n".join(lines)
    update_section(args.out, f"## SG-MCMC vs deep ensemble: {args.data}, {variant} (scripts/bench_sgmcmc.py)", section)
    print(section)


def _test_graphs(run: Path):
    splits = json.loads((run / "splits.json").read_text())
    store = run / "data_test.h5" if (run / "data_test.h5").is_file() else run / "data.h5"
    return FrameStore.open(store).graphs(splits["test"])


if __name__ == "__main__":
    main()
