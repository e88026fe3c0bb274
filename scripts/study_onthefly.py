"""On-the-fly active learning in MD: the uncertainty rule against relabelling every n steps and random MD frames.

The protocol (``configs/active_acac_onthefly.yaml``): a posterior trained on 50 acetylacetone configurations
from 300 K MD, relabelled by GFN2-xTB; four Langevin walkers with the current posterior, two at 600 K and two at
1,200 K; a GFN2-xTB call when the arm's rule fires; an update of the posterior after every call; MD goes on from
the labelled structure. Arms, each stopped after the same number of reference calls (``--calls``):

- ``rule``: the per-atom epistemic force std above a threshold (``force_std`` on the ``epistemic`` signal); the
  threshold is ``--threshold-factor`` times the largest per-structure max of that signal over the first
  posterior's own training structures (seed 0's first fit), the same for every seed: a call when the model is
  less sure than on any structure it was trained on;
- ``interval``: a call every ``--every`` MD steps of a walker (``rule.kind: interval``);
- ``random``: each uncertainty check (every 10 steps) with probability 10 / ``--every``, so as many calls per
  MD step on average as ``interval``.

Every arm keeps at least 100 steps (50 fs) between two calls of a walker. Test sets that no pool or trajectory of
the study held (checked by structure fingerprints, :mod:`mlip_uq.data.fingerprints`, against every labelled
structure of every run): 100 frames of the data set's 600 K MD trajectory (the loop's test set, after every
update) and its 45-frame dihedral scan (the final models), both relabelled by GFN2-xTB. Stability: with the final
posterior of each arm (``--stability-seeds``), ``--stability-runs`` Langevin runs of ``--stability-ps`` ps at
600 K and 1,200 K from the first walker's start (:func:`mlip_uq.stability.stability_runs`).

Results go to ``docs/study_onthefly_<method>.json`` and the section of ``docs/active_learning.md`` is written from
that file (``--report`` rewrites it from the JSON alone); the learning curves (600 K test force and energy MAE
against reference calls, seed mean ± standard deviation) to ``docs/active_learning_onthefly_<method>.png``. Finished
runs are reused and unfinished ones resumed.

    OMP_NUM_THREADS=1 python scripts/study_onthefly.py [--calls 12] [--every 500] [--seeds 0 1 2]
        [--stability-seeds 0] [--runs runs/study_onthefly] [--report]
"""

import argparse
import copy
import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import ase.io
import numpy as np
import torch
import yaml
from _harness import code_version, update_section
from nequip.utils.global_state import set_global_state
from study_active import calls_to_reach, curve, fraction, run_arm, spread, value_at

from mlip_uq import UQCalculator
from mlip_uq.active import load_active_config
from mlip_uq.active.oracle import oracle_from_config
from mlip_uq.config import dump_config
from mlip_uq.data import FrameStore
from mlip_uq.data.fingerprints import near_copies, nearest_distances
from mlip_uq.datasets import dataset_path
from mlip_uq.evaluate import evaluate_file
from mlip_uq.files import atomic_write, write_json
from mlip_uq.posterior import load_posterior
from mlip_uq.result_keys import ATOM_FORCE_STD_EPISTEMIC
from mlip_uq.stability import stability_runs
from mlip_uq.uq.plots import new_figure, save_figure

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "active_acac_onthefly.yaml"
HEADING = "## Study: on-the-fly relabelling in MD, acac 600 K / 1,200 K, {method} (scripts/study_onthefly.py)"
ARMS = ("rule", "interval", "random")
STYLE = {"rule": "-", "interval": "--", "random": ":"}


def base_config(method: str, path: Path = CONFIG) -> dict:
    """The configuration ``path`` (default the shipped one) as a mapping (``method``: ``sgmcmc_starts``, the config's recipe, or
    ``ensemble``: 4 members retrained on the grown set at every update, two at a time)."""
    cfg = yaml.safe_load(Path(path).read_text())
    if method == "ensemble":
        cfg["train"].pop("sgmcmc")
        cfg["train"].update(method="ensemble", ensemble={"n_members": 4, "n_processes": 2})
        cfg["update"] = {"retrain": True}
    return cfg


def arm_config(args, arm: str, seed: int, threshold: float) -> dict:
    cfg = base_config(args.method, args.config)
    cfg["seed"] = seed
    cfg["train"]["seed"] = seed
    cfg["budget"] = {"max_calls": args.calls if arm else 0, "target_forces_mae": None}
    uq_every = cfg["explore"]["uq_every"]
    cfg["rule"] = {"rule": {"kind": "force_std", "signal": "epistemic", "threshold": threshold},
                   "interval": {"kind": "interval", "every": args.every},
                   "random": {"kind": "random", "probability": uq_every / args.every},
                   None: {"kind": "interval", "every": args.every}}[arm]
    return cfg


def rule_threshold(args, runs: Path) -> float:
    """``--threshold-factor`` × the largest per-structure max epistemic force std (eV/Å) of seed 0's first
    posterior over its own training structures (a run with no exploration calls)."""
    path = runs / "initial" / "threshold.json"
    if not path.is_file():
        out = runs / "initial" / "seed0"
        run_arm(arm_config(args, None, 0, 0.0), out)
        calc = UQCalculator(load_posterior(out / json.loads((out / "summary.json").read_text())["posterior"]))
        per_structure = []
        for atoms in FrameStore.open(out / "labelled.h5").atoms():
            atoms.calc = calc
            per_structure.append(float(calc.get_property(ATOM_FORCE_STD_EPISTEMIC, atoms).max()))
        write_json({"max_train_epistemic": max(per_structure), "per_structure": per_structure}, path)
    return args.threshold_factor * json.loads(path.read_text())["max_train_epistemic"]


def branch(first: Path, out: Path, cfg: dict) -> None:
    """Start an arm's run in ``out`` from a copy of the seed's first fit in ``first`` (a run with no exploration
    calls and the same seed, initial set, test set, walkers and training), with the arm's configuration: what a
    fresh run of ``cfg`` would compute first, without computing it again."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(first, tmp)
    (tmp / "summary.json").unlink()
    dump_config(load_active_config(cfg), tmp / "active_config.yaml")
    tmp.rename(out)


def relabelled(path: Path, out: Path) -> Path:
    """``path``'s structures relabelled by GFN2-xTB, written once to ``out``."""
    if not out.is_file():
        oracle = oracle_from_config({"calculator": "tblite", "method": "GFN2-xTB"})
        frames = [oracle.label(atoms).atoms for atoms in ase.io.read(path, ":")]
        with atomic_write(out) as tmp:
            ase.io.write(tmp, frames, format="extxyz")
    return out


def final_errors(run: Path, dihedral: Path) -> dict:
    """The final posterior's force and energy MAE on the 600 K test set (the loop's last) and the dihedral scan."""
    summary = json.loads((run / "summary.json").read_text())
    scan = evaluate_file(run / summary["posterior"], dihedral)
    last = summary["history"][-1]
    return {"md600_forces_mae": last["forces_mae"], "md600_energy_mae": last["energy_mae"],
            "dihedral_forces_mae": scan["forces_mae"], "dihedral_energy_mae": scan["energy_mae"]}


def disjoint(runs_dirs, dihedral: Path) -> dict:
    """Fingerprint distances (Å) from every test structure to the nearest labelled structure of any run."""
    labelled = [a for run in runs_dirs for a in FrameStore.open(run / "labelled.h5").atoms()]
    tests = {"md600": FrameStore.open(runs_dirs[0] / "test.h5").atoms(), "dihedral": ase.io.read(dihedral, ":")}
    out = {}
    for name, frames in tests.items():
        distances = nearest_distances(frames, labelled)
        copies = near_copies(frames, labelled)
        if copies:
            raise SystemExit(f"test set {name}: structures {copies} are near-copies of labelled structures")
        out[name] = {"n": len(frames), "min_distance_A": float(distances.min()),
                     "median_distance_A": float(np.median(distances)), "near_copies": 0}
    scan = tests["dihedral"]  # for scale: neighbouring frames of the scan (4 degrees apart)
    out["scan_neighbours_A"] = float(np.median([nearest_distances([a], [b])[0] for a, b in zip(scan, scan[1:])]))
    out["labelled_structures"] = len(labelled)
    return out


def one_draw_per_start(posterior):
    """The posterior thinned to the last draw of each start (equal weights): MD with K = n_starts draws."""
    starts = posterior.hyperparameters["sample_starts"]
    last = sorted({s: k for k, s in enumerate(starts)}.values())
    return posterior.replace(samples={name: t[last] for name, t in posterior.samples.items()},
                             weights=torch.full((len(last),), 1.0 / len(last), dtype=torch.float64),
                             hyperparameters={**posterior.hyperparameters,
                                              "sample_starts": [starts[k] for k in last]})


def stability(args, run: Path, start) -> dict:
    path = run / "stability.json"
    if not path.is_file():
        summary = json.loads((run / "summary.json").read_text())
        posterior = load_posterior(run / summary["posterior"])
        if args.stability_thin:
            posterior = one_draw_per_start(posterior)
        calc = UQCalculator(posterior)
        steps = int(round(args.stability_ps * 1000 / 0.5))
        result = {}
        for temperature in (600.0, 1200.0):
            t0 = time.perf_counter()
            outcome = stability_runs(calc, start, temperature, n_runs=args.stability_runs, steps=steps,
                                     timestep_fs=0.5, check_every=100, seed=0, progress=True)
            result[f"{temperature:.0f}"] = {**outcome.to_dict(), "seconds": time.perf_counter() - t0,
                                            "draws": posterior.n_samples}
            logging.info("stability %s at %.0f K: %d of %d physical", run.name, temperature, outcome.physical,
                         outcome.n_runs)
        write_json(result, path)
    return json.loads(path.read_text())


def plot(results, calls, path):
    fig = new_figure(6.0, 7.0)
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(calls + 1)
    for ax, (key, unit) in zip(axes, (("forces_mae", "600 K test force MAE (meV/Å)"),
                                      ("energy_mae", "600 K test energy MAE (meV/atom)"))):
        for arm, per_seed in results.items():
            values = curve(per_seed, calls, key)
            mean, sd = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            line, = ax.plot(x, mean, STYLE[arm], label=f"{arm} ({len(values)} seeds)")
            ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("on-the-fly relabelling in MD (mean ± sd over seeds)")
    axes[1].set_xlabel("reference calls during MD")
    return save_figure(fig, path)


def run_study(args) -> dict:
    runs = args.runs / args.method
    threshold = rule_threshold(args, runs)
    logging.info("rule threshold: %.4f eV/Å", threshold)
    results, errors, versions = ({arm: {} for arm in args.arms} for _ in range(3))
    dirs = []
    dihedral = relabelled(dataset_path("dataset:botnet_acac/test_dihedral.xyz"),
                          args.runs / "dihedral_gfn2.extxyz")
    for seed in args.seeds:
        first = runs / "initial" / f"seed{seed}"
        run_arm(arm_config(args, None, seed, 0.0), first)
        for arm in args.arms:
            logging.info("=== %s, seed %d ===", arm, seed)
            out = runs / arm / f"seed{seed}"
            cfg = arm_config(args, arm, seed, threshold)
            if not (out / "state.json").is_file():
                branch(first, out, cfg)
            summary = out / "summary.json"
            if not (summary.is_file() and json.loads(summary.read_text())["stop_reason"]):  # to run or finish
                with open(out / "code_versions.txt", "a") as handle:  # the code each (re)start of the run used
                    handle.write(code_version() + "\n")
            results[arm][str(seed)] = run_arm(cfg, out)
            versions[arm][str(seed)] = (out / "code_versions.txt").read_text().split()
            errors[arm][str(seed)] = final_errors(out, dihedral)
            dirs.append(out)
    start = ase.io.read(dataset_path(base_config(args.method, args.config)["explore"]["starts"]["path"]), 0)
    stable = {arm: {str(s): stability(args, runs / arm / f"seed{s}", start) for s in args.stability_seeds}
              for arm in args.stability_arms}
    return {"date": date.today().isoformat(), "code_version": code_version(), "run_code_versions": versions,
            "method": args.method,
            "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python scripts/study_onthefly.py "
                       + shlex.join(sys.argv[1:]),
            "calls": args.calls, "every": args.every, "threshold_eV_per_A": threshold,
            "summaries": results, "final": errors, "disjoint": disjoint(dirs, dihedral), "stability": stable}


def call_ratios(study) -> dict:
    """Calls the rule (and random) needs to reach the interval arm's final 600 K test force MAE, / its calls:
    from the seed-mean curves and per seed (paired, same seed)."""
    calls, results = study["calls"], study["summaries"]
    target_runs = curve(results["interval"], calls)[:, -1]
    out = {}
    for arm in [a for a in ("rule", "random") if a in results]:
        values = curve(results[arm], calls)
        out[arm] = {"target_mev_per_a": float(np.nanmean(target_runs)),
                    "ratio": calls_to_reach(np.nanmean(values, axis=0), float(np.nanmean(target_runs))) / calls,
                    "per_seed": [calls_to_reach(row, t) / calls for row, t in zip(values, target_runs)]}
    return out


def report(study, doc: Path, png: Path) -> str:
    calls, results = study["calls"], study["summaries"]
    checkpoints = sorted({0, calls // 4, calls // 2, calls})
    ratios = call_ratios(study)
    head = ("| arm | rule | seeds | " + " | ".join(f"600 K force MAE @ +{c}" for c in checkpoints)
            + f" | @ +{calls} per seed | dihedral force MAE | 600 K energy MAE | MD steps | share outside calls and "
              "updates |")
    rules = {"rule": f"epistemic force std > {study['threshold_eV_per_A']:.3f} eV/Å",
             "interval": f"every {study['every']} steps", "random": f"p = {10 / study['every']:.3f} per check"}
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, per_seed in results.items():
        summaries = list(per_seed.values())
        finals = list(study["final"][arm].values())
        maes = " | ".join(spread([value_at(s["history"], c) for s in summaries]) for c in checkpoints)
        share = spread([100 * s["overhead_fraction"] for s in summaries])
        per_seed_final = ", ".join(f"{value_at(s['history'], calls):.0f}" for s in summaries)
        lines.append(f"| {arm} | {rules[arm]} | {len(summaries)} | {maes} | {per_seed_final} | "
                     f"{spread([1000 * f['dihedral_forces_mae'] for f in finals])} | "
                     f"{spread([1000 * f['md600_energy_mae'] for f in finals])} | "
                     f"{statistics.mean(s['md_steps'] for s in summaries):.0f} | {share} % |")
    body = [f"Measured {study['date']} (code {study['code_version']}) with `{study['command']}` on the 2-core CPU "
            f"machine. The protocol of `configs/active_acac_onthefly.yaml`; {calls} reference calls per run; "
            "600 K force MAE in meV/Å and energy MAE in meV/atom, seed mean ± sd after +N calls; the share of wall "
            "time outside the reference calls and the updates (MD with the posterior, test evaluation, "
            "bookkeeping) from each run's `summary.json`. Numbers: "
            f"[{Path(doc).parent.name}/study_onthefly_{study['method']}.json](study_onthefly_{study['method']}.json).",
            "", "Code of each run (one entry per start or resume; a range: runs of the study's first branch): "
            + "; ".join(f"{arm} seed {seed} {', '.join(v)}" for arm, per_seed in study["run_code_versions"].items()
                        for seed, v in per_seed.items()) + ".",
            "", f"![600 K test MAE vs reference calls]({png.name})", "", *lines, "",
            "**Call ratio** (calls an arm needs to reach the fixed-interval arm's final 600 K test force MAE / "
            "the interval arm's calls; target ≤ 0.5 on every seed):", ""]
    for arm, r in ratios.items():
        body.append(f"- {arm} (target {r['target_mev_per_a']:.1f} meV/Å): {fraction(r['ratio'])} from the "
                    f"seed-mean curves; per seed {', '.join(fraction(x) for x in r['per_seed'])}.")
    d = study["disjoint"]
    body += ["", f"Test sets against the {d['labelled_structures']} labelled structures of all runs (fingerprint "
             "distance, RMS difference of the sorted interatomic distances): 600 K frames nearest "
             f"{d['md600']['min_distance_A']:.3f} Å (median {d['md600']['median_distance_A']:.3f} Å), dihedral scan "
             f"nearest {d['dihedral']['min_distance_A']:.3f} Å (median {d['dihedral']['median_distance_A']:.3f} Å); "
             f"no near-copy (< 0.01 Å); for scale, neighbouring scan frames (4° apart) differ by "
             f"{d['scan_neighbours_A']:.3f} Å (median).", "", "**Stability** (final posterior; runs that stayed physical):", ""]
    if not any(study["stability"].values()):
        body.append("- not run for this recipe")
    for arm, per_seed in study["stability"].items():
        for seed, temps in per_seed.items():
            body.append(f"- {arm}, seed {seed}: " + "; ".join(
                f"{t['physical']} of {t['n_runs']} runs of {t['time_ps']:.0f} ps at {k} K" for k, t in temps.items()))
    text = "\n".join(body)
    update_section(doc, HEADING.format(method=study["method"]), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["sgmcmc_starts", "ensemble"], default="sgmcmc_starts")
    parser.add_argument("--config", type=Path, default=CONFIG, help="the protocol (relative paths: as in it)")
    parser.add_argument("--calls", type=int, default=12, help="reference calls per run during MD")
    parser.add_argument("--every", type=int, default=500, help="interval arm: MD steps between two calls")
    parser.add_argument("--threshold-factor", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stability-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--stability-arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--stability-thin", action="store_true",
                        help="stability MD with one draw per start (K = n_starts) instead of every draw")
    parser.add_argument("--stability-runs", type=int, default=10)
    parser.add_argument("--stability-ps", type=float, default=10.0)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study_onthefly")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "active_learning.md")
    parser.add_argument("--report", action="store_true", help="rewrite the docs section from the JSON alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results_path = args.doc.with_name(f"study_onthefly_{args.method}.json")
    png = args.doc.with_name(f"active_learning_onthefly_{args.method}.png")
    if args.report:
        study = json.loads(results_path.read_text())
    else:
        set_global_state()
        study = run_study(args)
        write_json(copy.deepcopy(study), results_path)
    plot(study["summaries"], study["calls"], png)
    print(report(study, args.doc, png))


if __name__ == "__main__":
    main()
