"""MAP, adaptive SG-MCMC, deep ensembles, mean-field VI and MC dropout on the same data, side by side in one run.

Every method trains through ``mlip_uq.train.train`` on the data, split and architecture of one MAP
configuration (``configs/ethanol_map.yaml``: rMD17 ethanol, 50 training structures, official test split;
``configs/tio2_subset_map.yaml``: the bundled 1,000-structure TiO2 subset, random 90/10): each method's own
configuration (``configs/<data>_<method>.yaml``) gives its method section, and the MAP configuration's ``data``
and ``model`` sections (and its ``training`` section, for ensemble members and dropout) replace its own. MC
dropout keeps its readout hidden layer (units to drop). SG-MCMC and VI start from the MAP run's model, with
their prior centred there (``sgmcmc.init``/``vi.init``, ``*.prior.center``); their wall-clock includes the MAP
run's. The 4 chains run in 2 processes of one thread each (:data:`PARALLEL_CHAINS`); the methods run in the
order of the comparison the targets make (MAP, one SG-MCMC chain, ensemble), then 4 chains, VI and dropout.

Reported on the test split, **raw** and after the default recalibration (one factor per quantity fitted on the
validation split, :func:`mlip_uq.uq.calibration.fit_calibration`): energy and force MAE, NLL, miscalibration
area, Spearman of std vs error, force sharpness; the training cost (wall-clock from the run's first file to
its metrics, the MAP start's included for SG-MCMC and VI; for the ensemble the sum of its members' epoch
seconds, which stays right when the run was resumed); the MAP model's plateau (best epoch of
epochs run); for SG-MCMC the smallest per-layer median effective sample size of the draws and the largest
split-R̂ over the layers (several chains); with ``--ood FILE`` the AUROC of the per-structure max
``atom_force_std`` for telling the structures of FILE (e.g. acetylacetone 600 K frames for a model of the 300 K
ones) from the test split, with ``--ood-top-energy N`` the same for the N highest-energy structures of the data
file that were neither trained nor validated on. Targets (issue 11):
raw force miscalibration area <= 0.10 for SG-MCMC and the ensemble; one chain's force NLL <= the 5-member
ensemble's at <= 1/3 of its wall-clock; energy Spearman >= 0.3; posterior-mean force MAE <= the MAP model's.

    OMP_NUM_THREADS=2 python scripts/bench_sgmcmc.py --data ethanol [--noise learned|head]
        [--methods map sgmcmc ensemble vi dropout] [--ood FILE | --ood-top-energy N] [--out docs/benchmarks.md]
        [--report]

Finished runs (their ``metrics.json`` exists) are reused and evaluations are cached (``bench.json`` in each
run), so an interrupted benchmark continues where it stopped. After every method the numbers so far go with the
date and code version to ``docs/bench_sgmcmc_<data>_noise_<noise>.json`` and the section of ``--out`` is written
from that file; ``--report`` rewrites the section from the JSON alone.
"""

import argparse
import copy
import csv
import json
import logging
from pathlib import Path

import numpy as np
from _harness import provenance, reading, stamped, update_section

# torch and the mlip_uq modules that import it are imported where they are used: the report stays light

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("map", "sgmcmc", "ensemble", "vi", "dropout")
BASE = {"ethanol": ROOT / "configs" / "ethanol_map.yaml", "tio2": ROOT / "configs" / "tio2_subset_map.yaml"}
WITH_TRAINING = ("ensemble", "dropout")
# the 4 chains in 2 processes of one thread each; the ensemble's members one after the other with two threads,
# as the MAP model trains, so that its cost (the sum of the members' epoch seconds, which a resumed run keeps)
# is measured as the MAP model's is
PARALLEL_CHAINS = ["sgmcmc.n_processes=2"]


def method_config(data: str, method: str, noise: str) -> dict:
    """The run configuration of ``method``: its own method section on the MAP configuration's data and model."""
    from mlip_uq.config import load_config

    base = load_config(BASE[data]).to_dict()
    if method == "map":
        config = copy.deepcopy(base)
    else:
        config = load_config(ROOT / "configs" / f"{data}_{method}.yaml").to_dict()
        config["data"] = copy.deepcopy(base["data"])
        config["model"] = {**config.get("model", {}), **base["model"]}
        if method in WITH_TRAINING:
            config["training"] = copy.deepcopy(base["training"])
    config["model"]["noise"] = noise
    config["name"] = f"bench_{data}_{method}"
    return config


def timed_train(config: dict, out: Path, overrides=()) -> float:
    """Train (or reuse a finished run in ``out``, or resume an interrupted one) and return the wall-clock in
    seconds: from the run's ``config.yaml`` (written first) to its ``metrics.json`` (written last)."""
    from mlip_uq.train import train

    if not (out / "metrics.json").is_file():
        train(config, out_dir=out, overrides=list(overrides), resume=(out / "config.yaml").is_file())
    return (out / "metrics.json").stat().st_mtime - (out / "config.yaml").stat().st_mtime


def unused_high_energy(config, data, n: int) -> list:
    """The ``n`` structures of the run's data file (``config``, a ``RunConfig``) with the highest energy per atom
    among those it neither trained nor validated on: a property-range shift from the training data."""
    from mlip_uq.data import read_frames

    frames = read_frames(config.data.path, keys=config.data.keys, type_names=data.type_names)
    used = set(data.indices["train"]) | set(data.indices["val"])
    pool = [i for i in range(len(frames)) if i not in used]
    per_atom = np.array([frames[i].get_potential_energy() / len(frames[i]) for i in pool])
    return [frames[pool[i]] for i in np.argsort(per_atom)[::-1][:n]]


def evaluate(out: Path, ood_path: Path | None, ood_top_energy: int | None = None) -> dict:
    """Raw and recalibrated test metrics of the run in ``out`` (cached in ``out/bench.json``)."""
    cached = out / "bench.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch

    from mlip_uq.config import load_config
    from mlip_uq.data import atoms_to_graph, read_frames
    from mlip_uq.evaluate import metrics_and_plots, predict_graphs
    from mlip_uq.files import write_json
    from mlip_uq.posterior import load_posterior
    from mlip_uq.train import prepare_data
    from mlip_uq.uq.metrics import auroc

    config = load_config(out / "config.yaml")
    data = prepare_data(config, out)
    posterior = load_posterior(out / "posterior.h5")
    batch = config.evaluate.batch_size
    val = predict_graphs(posterior, data.val, batch).with_calibration({})
    test = predict_graphs(posterior, data.test, batch).with_calibration({})
    calibration = val.fitted_calibration()
    result = {"raw": metrics_and_plots(test), "recalibrated": metrics_and_plots(test.with_calibration(calibration)),
              "calibration": calibration, "n_samples": posterior.n_samples, "n_test": len(data.test)}
    if ood_path is not None or ood_top_energy:
        frames = (read_frames(ood_path, type_names=posterior.config.type_names) if ood_path is not None
                  else unused_high_energy(config, data, ood_top_energy))
        dtype = getattr(torch, posterior.config.dtype)
        ood = predict_graphs(posterior, [atoms_to_graph(a, posterior.config.type_names, posterior.config.r_max,
                                                        dtype=dtype) for a in frames], batch).with_calibration({})
        scores = np.concatenate([test.max_atom_force_std(), ood.max_atom_force_std()])
        labels = np.concatenate([np.zeros(len(test.n_atoms)), np.ones(len(ood.n_atoms))])
        result["ood_auroc"] = auroc(scores, labels, 0.5)
    write_json(result, cached)
    return result


def plateau(out: Path) -> str:
    """``best epoch / epochs run`` (lowest val_loss) of each MAP-type training in ``out``: the run's own
    ``logs/metrics.csv``, each ensemble member's."""
    found = []
    for path in sorted(out.glob("**/logs/metrics.csv")):
        rows = [r for r in csv.DictReader(path.open()) if r.get("val_loss")]
        if rows:
            best = min(range(len(rows)), key=lambda i: float(rows[i]["val_loss"]))
            found.append(f"{int(rows[best]['epoch']) + 1} / {int(rows[-1]['epoch']) + 1}")
    return ", ".join(found) or "–"


def epoch_seconds(out: Path) -> float:
    """The training seconds of every MAP-type training in ``out``: the sum of the ``seconds`` column of their
    ``logs/metrics.csv`` (each ensemble member's)."""
    return sum(float(r["seconds"]) for path in out.glob("**/logs/metrics.csv")
               for r in csv.DictReader(path.open()) if r.get("seconds"))


def mixing(out: Path) -> str:
    """An SG-MCMC run's smallest per-layer median ESS of its draws (all chains) and, with several chains, its
    largest split-R̂ (``sgmcmc/diagnostics.json``); "–" for other methods."""
    path = out / "sgmcmc" / "diagnostics.json"
    if not path.is_file():
        return "–"
    layers = json.loads(path.read_text())["layers"].values()
    if not layers:
        return "–"
    text = f"{min(layer['ess_median'] for layer in layers):.1f}"
    rhat = [layer["rhat_max"] for layer in layers if "rhat_max" in layer]
    return text + (f" / {max(rhat):.2f}" if rhat else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(BASE), required=True)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--noise", choices=["learned", "head"], default="learned",
                        help="the models' observation noise: per element (default) or per atom from the noise head")
    ood = parser.add_mutually_exclusive_group()
    ood.add_argument("--ood", type=Path, help="labelled structures unlike the training data (AUROC vs the test split)")
    ood.add_argument("--ood-top-energy", type=int, metavar="N",
                     help="out-of-distribution set: the N highest-energy structures of the data file not trained on")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_sgmcmc")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--report", action="store_true",
                        help="rewrite the section from docs/bench_sgmcmc_<data>_noise_<noise>.json alone")
    args = parser.parse_args()
    if args.report:
        path = results_path(args.data, args.noise)
        update_section(args.out, heading(args.data, args.noise), report(json.loads(path.read_text()), path))
        return
    from nequip.utils.global_state import set_global_state

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_global_state()
    runs = args.runs / args.data / f"noise_{args.noise}"
    methods = list(dict.fromkeys(["map", *args.methods] if {"sgmcmc", "vi"} & set(args.methods) else args.methods))
    rows = {}

    def run(name: str, method: str, out: Path, overrides=(), extra_seconds: float = 0.0) -> None:
        wall = timed_train(method_config(args.data, method, args.noise), out, overrides) + extra_seconds
        # the ensemble's cost: its members' training seconds (several sessions' worth when it was resumed)
        cost = epoch_seconds(out) if method == "ensemble" else wall
        rows[name] = dict(evaluate(out, args.ood, args.ood_top_energy), wall_s=wall, cost_s=cost,
                          plateau=plateau(out), mixing=mixing(out))
        write_report(rows, args)  # after every method: an interrupted benchmark reports what it has

    map_dir = runs / "map"
    if "map" in methods:
        run("MAP", "map", map_dir)
    start = map_dir / "posterior.h5"

    def sgmcmc(chains: int) -> None:
        run(f"SG-MCMC from MAP, {chains} chain{'s' if chains > 1 else ''}", "sgmcmc", runs / f"sgmcmc_{chains}chain",
            [f"sgmcmc.n_chains={chains}", f"sgmcmc.init={start}", f"sgmcmc.prior.center={start}", *PARALLEL_CHAINS],
            rows["MAP"]["wall_s"])

    if "sgmcmc" in methods:
        sgmcmc(1)
    if "ensemble" in methods:
        run(f"deep ensemble ({args.members} members)", "ensemble", runs / f"ensemble_{args.members}",
            [f"ensemble.n_members={args.members}"])
    if "sgmcmc" in methods:
        sgmcmc(4)
    if "vi" in methods:
        run("mean-field VI from MAP", "vi", runs / "vi", [f"vi.init={start}", f"vi.prior.center={start}"],
            rows["MAP"]["wall_s"])
    if "dropout" in methods:
        run("MC dropout", "dropout", runs / "dropout")


def results_path(data: str, noise: str) -> Path:
    """The JSON of this benchmark's numbers for one data set and noise model."""
    return ROOT / "docs" / f"bench_sgmcmc_{data}_noise_{noise}.json"


def heading(data: str, noise: str) -> str:
    return f"## MAP, SG-MCMC, deep ensemble, VI and MC dropout: {data}, noise {noise} (scripts/bench_sgmcmc.py)"


def write_report(rows: dict, args) -> None:
    """The record of the methods run so far (docs/bench_sgmcmc_<data>_noise_<noise>.json) and the section of
    ``args.out`` written from it (a new record: its reading is still to be written, see ``_harness``)."""
    import torch

    from mlip_uq.files import write_json

    one, ens = rows.get("SG-MCMC from MAP, 1 chain"), rows.get(f"deep ensemble ({args.members} members)")
    record = stamped({
        "command": f"OMP_NUM_THREADS=2 python scripts/bench_sgmcmc.py --data {args.data} --noise {args.noise}"
                   f"{f' --ood {args.ood.name}' if args.ood else ''}"
                   f"{f' --ood-top-energy {args.ood_top_energy}' if args.ood_top_energy else ''}",
        "torch": torch.__version__, "config": BASE[args.data].name, "members": args.members,
        "chain_cost_per_ensemble": one["cost_s"] / ens["cost_s"] if one and ens else None, "rows": rows})
    path = results_path(args.data, args.noise)
    write_json(record, path)
    section = report(record, path)
    update_section(args.out, heading(args.data, args.noise), section)
    print(section)


def report(record: dict, path: Path) -> str:
    """The section's body (below its heading) from the record alone; the hand-written reading (the record's
    ``reading``, :func:`_harness.reading`) follows the provenance line."""
    rows = record["rows"]
    first = next(iter(rows.values()))
    lines = [
        f"Measured {record['date']}, 2 CPU cores, torch {record['torch']}: `{record['command']}`; data, split and "
        f"model of `configs/{record['config']}`. Test set: {first['n_test']} structures. Energies in meV/atom, "
        "forces in meV/Å; raw / recal. = as predicted / after one factor per quantity fitted on the validation split.",
        "",
        "| method | samples | energy MAE | force MAE | energy NLL raw / recal. | force NLL raw / recal. | "
        "force miscal. raw / recal. | energy Spearman | force Spearman | force sharpness | OOD AUROC | "
        "training cost | MAP-type plateau (best / epochs) | ESS / R̂ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        raw, cal = m["raw"], m["recalibrated"]
        lines.append(
            f"| {name} | {m['n_samples']} | {1000 * raw['energy_mae']:.2f} | {1000 * raw['forces_mae']:.1f} | "
            f"{raw['energy_nll']:.3f} / {cal['energy_nll']:.3f} | {raw['forces_nll']:.3f} / {cal['forces_nll']:.3f} | "
            f"{raw['forces_miscal_area']:.3f} / {cal['forces_miscal_area']:.3f} | {raw['energy_spearman']:.2f} | "
            f"{raw['forces_spearman']:.2f} | {1000 * raw['forces_sharpness']:.1f} | "
            f"{m['ood_auroc'] if 'ood_auroc' in m else float('nan'):.3f} | {m['cost_s'] / 60:.1f} min | "
            f"{m['plateau']} | {m.get('mixing', '–')} |"
        )
    one, ens = rows.get("SG-MCMC from MAP, 1 chain"), rows.get(f"deep ensemble ({record['members']} members)")
    if one and ens:
        lines += ["", (
            f"One chain vs the ensemble: raw force NLL {one['raw']['forces_nll']:.3f} vs {ens['raw']['forces_nll']:.3f}, "
            f"raw force miscalibration area {one['raw']['forces_miscal_area']:.3f} vs "
            f"{ens['raw']['forces_miscal_area']:.3f}, training cost {record['chain_cost_per_ensemble']:.2f}x the "
            "ensemble's (the chain's MAP start included; target: better or equal on both at <= 0.33x)."
        )]
    return "\n".join(lines + ["", provenance(record, path), "", reading(record, path), ""])


if __name__ == "__main__":
    main()
