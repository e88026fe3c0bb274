"""SG-MCMC over several basins against a deep ensemble: in distribution, out of distribution, per unit compute.

Acetylacetone (BOTNet data): 100 training and 50 validation structures of the 300 K training file; tested on the
300 K MD test frames (in distribution) and on the 650 frames of the 600 K MD test file (out of distribution:
the same molecule, larger distortions). Rows, all on one data split and architecture:

- **MAP**: member 0 of the ensemble alone;
- **deep ensemble (5)**: ``configs/acac_300K_ensemble.yaml``;
- **SG-MCMC, k starts** (k = 1 ... 5): ``configs/acac_300K_sgmcmc.yaml`` (the recipe of
  :mod:`mlip_uq.inference.starts`) run once with 5 starts whose MAP fits are the ensemble's members (the same
  seeds and training settings: copied, not trained twice); the k-start posterior pools the draws of starts
  0 ... k-1 and has its noise fitted on the validation set as the run's own is (the 5-start row is the run's);
- **cyclical SG-MCMC, one fresh start**: cosine cycles whose peak step is the MAP training's rate in Adam units
  (η/α = ``training.lr``: the velocity of a preconditioned SGHMC step settles at η/α times the normalised
  gradient), a noise-free exploration for most of each cycle and draws at its end.

Columns: raw (as the method predicts) and recalibrated (one factor per quantity fitted on the validation set)
force NLL and miscalibration area on the 300 K frames; OOD AUROC of the per-structure max per-atom force std,
predictive and epistemic, telling 600 K from 300 K frames; the ratio of the mean epistemic per-atom force std
600 K / 300 K; the recalibrated force NLL on the 600 K frames; the between-start (or between-cycle) share of
the epistemic force variance on the validation set; training compute as minibatch gradient steps (the MAP
fits' and the chains'; validation passes not counted), and as minutes: the MAP fits' epoch seconds plus the
sampling seconds (each start's, from ``starts/starts.json``), summed whether they ran in parallel or not. The
minutes depend on what else ran on the 2 cores (the members' epochs took 0.6-3.3 s here); the steps do not.
Run with one thread: on a busy 2-core machine two OpenMP threads per process made the chain's steps ~20x slower
(measured).

    OMP_NUM_THREADS=1 python scripts/bench_starts.py [--runs runs/bench_starts/acac] [--out docs/benchmarks.md]

Finished runs are reused (an interrupted benchmark continues where it stopped). Numbers go to
``docs/bench_starts.json``, the table to a section of ``docs/benchmarks.md``, the plot to
``docs/bench_starts_acac.png``.
"""

import argparse
import copy
import csv
import json
import logging
import shutil
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from _harness import update_section
from nequip.utils.global_state import set_global_state

from mlip_uq import __version__
from mlip_uq.compare import ood_scores
from mlip_uq.config import dump_config, load_config
from mlip_uq.data import atoms_to_graph, read_frames
from mlip_uq.evaluate import metrics_and_plots, predict_graphs
from mlip_uq.files import load_checkpoint, write_json
from mlip_uq.inference.noise import fit_posterior_noise_on_validation
from mlip_uq.inference.sgmcmc import SGMCMCSettings
from mlip_uq.inference.starts import DRAWS, between_start_share, member_epoch_seconds, pool_starts
from mlip_uq.posterior import Posterior, load_posterior
from mlip_uq.train import prepare_data, train

ROOT = Path(__file__).resolve().parents[1]
ENSEMBLE = ROOT / "configs" / "acac_300K_ensemble.yaml"
RECIPE = ROOT / "configs" / "acac_300K_sgmcmc.yaml"
OOD = ROOT.parent / "shared" / "data" / "botnet_acac" / "test_MD_600K.xyz"
HEADING = "## SG-MCMC over several basins vs a deep ensemble: acetylacetone 300 K -> 600 K (scripts/bench_starts.py)"


def run(config, out: Path) -> float:
    """Train (or reuse / resume) the run in ``out``; its wall seconds (``train_seconds.json``)."""
    timing = out / "train_seconds.json"
    if not timing.is_file():
        begin = time.perf_counter()
        train(config, out_dir=out, resume=(out / "config.yaml").is_file())
        write_json({"train_seconds": time.perf_counter() - begin}, timing)
    return json.loads(timing.read_text())["train_seconds"]


def recipe_run(runs: Path, ensemble_dir: Path) -> Path:
    """The 5-start recipe, its starts' MAP fits the ensemble's members (final state and validation curve)."""
    out = runs / "sgmcmc_starts"
    config = load_config(RECIPE)
    config["data"]["store"] = str(ensemble_dir / "data.h5")
    for s in range(config["sgmcmc"]["n_starts"]):
        member, start = ensemble_dir / "members" / str(s), out / "starts" / "members" / str(s)
        if not (start / "final.pt").is_file():
            (start / "logs").mkdir(parents=True, exist_ok=True)
            shutil.copy(member / "logs" / "metrics.csv", start / "logs" / "metrics.csv")
            shutil.copy(member / "final.pt", start / "final.pt")
    if not (out / "config.yaml").is_file():
        dump_config(config, out / "config.yaml")
    run(config, out)
    return out


def cyclical_run(runs: Path, ensemble_dir: Path) -> Path:
    """One chain from a fresh initialisation with cyclical steps peaking at the MAP rate (η/α = training.lr)."""
    config = load_config(RECIPE)
    config["data"]["store"] = str(ensemble_dir / "data.h5")
    section = config["sgmcmc"]
    peak = section["friction"] * config["training"]["lr"]
    config["sgmcmc"] = {**{k: section[k] for k in ("friction", "batch_size")}, "n_starts": 1, "init": None,
                        "prior": {"scale": 1.0}, "lr": peak, "burnin_steps": 2000, "preheat_steps": 0,
                        "cycle_steps": 1000, "exploration_fraction": 0.8, "thinning": 50, "n_samples": 16}
    config.pop("training")
    out = runs / "sgmcmc_cyclical"
    run(config, out)
    return out


def fit_steps(member: Path) -> int:
    """Minibatch gradient steps of a MAP fit (the last ``step`` of its ``logs/metrics.csv``)."""
    with open(member / "logs" / "metrics.csv") as f:
        return int(list(csv.DictReader(f))[-1]["step"])


def chain_steps(run_dir: Path) -> int:
    """Minibatch gradient steps of a run's SG-MCMC chains (their checkpoints' ``step``)."""
    return sum(int(torch.load(p, weights_only=True)["step"]) for p in (run_dir / "sgmcmc").glob("chain*.ckpt"))


def graphs_of(path: Path, posterior: Posterior):
    frames = read_frames(path, type_names=posterior.config.type_names)
    dtype = getattr(torch, posterior.config.dtype)
    return [atoms_to_graph(a, posterior.config.type_names, posterior.config.r_max, dtype=dtype) for a in frames]


def evaluate(posterior: Posterior, data, ood_graphs, batch: int = 16) -> dict:
    """Raw and recalibrated metrics on the 300 K frames, OOD scores and the recalibrated 600 K NLL."""
    val = predict_graphs(posterior, data.val, batch).with_calibration({})
    test = predict_graphs(posterior, data.test, batch).with_calibration({})
    ood = predict_graphs(posterior, ood_graphs, batch).with_calibration({})
    calibration = val.fitted_calibration()
    return {"raw": metrics_and_plots(test), "recalibrated": metrics_and_plots(test.with_calibration(calibration)),
            "ood_raw": metrics_and_plots(ood), "ood_recalibrated": metrics_and_plots(ood.with_calibration(calibration)),
            "calibration": calibration, "n_samples": posterior.n_samples, **ood_scores(test, ood)}


def rows(runs: Path) -> list:
    ensemble_dir = runs / "ensemble"
    run(load_config(ENSEMBLE), ensemble_dir)
    recipe = recipe_run(runs, ensemble_dir)
    cyclical = cyclical_run(runs, ensemble_dir)
    config = yaml.safe_load((recipe / "config.yaml").read_text())
    data = prepare_data(config, recipe)
    ensemble = load_posterior(ensemble_dir / "posterior.h5")
    ood_graphs = graphs_of(OOD, ensemble)
    starts = json.loads((recipe / "starts" / "starts.json").read_text())["starts"]
    members = [member_epoch_seconds(ensemble_dir / "members" / str(s)) for s in range(5)]
    member_steps = [fit_steps(ensemble_dir / "members" / str(s)) for s in range(5)]
    start_steps = [chain_steps(recipe / "starts" / str(s)) for s in range(5)]
    out = []

    def row(name, posterior, seconds, steps, extra=None):
        cached = runs / "bench" / f"{name}.json"
        if not cached.is_file():
            logging.info("evaluating %s", name)
            write_json({"name": name, **(extra or {}), **evaluate(posterior, data, ood_graphs)}, cached)
        out.append({**json.loads(cached.read_text()), "train_seconds": seconds, "train_steps": steps})

    member0 = load_checkpoint(ensemble_dir / "members" / "0" / "final.pt")
    row("MAP", Posterior.from_state_dicts(ensemble.config, [member0], method="map",
                                          energy_references=ensemble.energy_references), members[0], member_steps[0])
    row("deep ensemble (5)", ensemble, sum(members), sum(member_steps))
    parts = [load_posterior(recipe / "starts" / str(s) / DRAWS) for s in range(5)]
    for k in range(1, 6):
        if k == 5:
            pooled = load_posterior(recipe / "posterior.h5")
        else:
            pooled = fit_posterior_noise_on_validation(pool_starts(parts[:k]), data.val, config["sgmcmc"]["batch_size"])
        share = between_start_share(pooled, data.val) if k > 1 else None
        seconds = sum(members[:k]) + sum(s["sampling_seconds"] for s in starts[:k])
        row(f"SG-MCMC, {k} start{'s' * (k > 1)}", pooled, seconds, sum(member_steps[:k]) + sum(start_steps[:k]),
            {"n_starts": k, "between_start": share, "ess": [s["ess_min_layer_median"] for s in starts[:k]]})
    cyc = load_posterior(cyclical / "posterior.h5")
    cycle_config = yaml.safe_load((cyclical / "config.yaml").read_text())
    schedule = SGMCMCSettings.from_dict(cycle_config).schedule()
    labels = [i // schedule.per_cycle for i in range(cyc.n_samples)]  # the draws of one cycle, in order
    share = between_start_share(cyc.replace(hyperparameters={**cyc.hyperparameters, "sample_starts": labels}),
                                data.val)
    row("cyclical SG-MCMC, fresh start", cyc, json.loads((cyclical / "train_seconds.json").read_text())["train_seconds"],
        chain_steps(cyclical), {"between_start": share, "cycle_steps": schedule.cycle_steps, "draws_per_cycle": schedule.per_cycle})
    return out


def table(results: list) -> str:
    ens = next(r for r in results if r["name"].startswith("deep ensemble"))
    head = ("| method | K | force NLL raw / recal. | force miscal. raw / recal. | force MAE (meV/Å) | OOD AUROC epistemic "
            "/ total | epistemic std 600 K / 300 K | 600 K force NLL recal. | between-start share | "
            "training steps (compute / ensemble's) | training minutes |")
    lines = [head, "|---" * 11 + "|"]
    for r in results:
        share = r.get("between_start")
        lines.append(
            f"| {r['name']} | {r['n_samples']} | {r['raw']['forces_nll']:.3f} / {r['recalibrated']['forces_nll']:.3f} "
            f"| {r['raw']['forces_miscal_area']:.3f} / {r['recalibrated']['forces_miscal_area']:.3f} "
            f"| {1000 * r['raw']['forces_mae']:.1f} | {r['ood_auroc_epistemic']:.3f} / {r['ood_auroc']:.3f} "
            f"| {r['epistemic_ratio']:.3f} | {r['ood_recalibrated']['forces_nll']:.3f} "
            f"| {'–' if not share else format(share['between_share'], '.2f')} "
            f"| {r['train_steps']:,} ({r['train_steps'] / ens['train_steps']:.2f}) | {r['train_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def plot(results: list, path: Path) -> None:
    from matplotlib.figure import Figure

    ens = next(r for r in results if r["name"].startswith("deep ensemble"))
    chains = [r for r in results if r.get("n_starts")]
    k = [r["n_starts"] for r in chains]
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 3)
    for ax, (label, get) in zip(axes, [("force NLL, 300 K (raw)", lambda r: r["raw"]["forces_nll"]),
                                       ("OOD AUROC (epistemic), 600 K vs 300 K", lambda r: r["ood_auroc_epistemic"]),
                                       ("force NLL, 600 K (recalibrated)", lambda r: r["ood_recalibrated"]["forces_nll"])]):
        ax.plot(k, [get(r) for r in chains], "o-", label="SG-MCMC, k starts")
        ax.axhline(get(ens), color="C3", ls="--", label="deep ensemble (5)")
        ax.set_xlabel("starts")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_starts" / "acac")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_global_state()
    results = rows(args.runs)
    record = {"date": date.today().isoformat(), "version": __version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "command": "OMP_NUM_THREADS=1 python scripts/bench_starts.py",
              "rows": copy.deepcopy(results)}
    write_json(record, ROOT / "docs" / "bench_starts.json")
    plot(results, ROOT / "docs" / "bench_starts_acac.png")
    body = (f"Measured {record['date']} (mlip_uq {__version__}, torch {torch.__version__}, 2 CPU cores shared with "
            f"other work): `{record['command']}`; numbers in [bench_starts.json](bench_starts.json), plot "
            "[bench_starts_acac.png](bench_starts_acac.png).\n\n" + table(results))
    update_section(args.out, HEADING, body)
    print(table(results))


if __name__ == "__main__":
    main()
