"""Data efficiency of uncertainty-triggered vs random relabelling, GFN2-xTB as the reference, several seeds.

Active-learning runs of one system's configuration, each stopped after the same number of reference calls:

- ``--system acac`` (``configs/active_acac_xtb.yaml``): 20 acetylacetone configurations from 300 K MD, MD
  exploration at 600 K, a test set of 600 K MD configurations, a pool of 600 K MD configurations; exploration
  has to leave the training data's distribution, as it does in practice;
- ``--system acac_mixed``: the same, but the pool holds 300 K and 600 K MD configurations in equal numbers (the
  300 K ones from another trajectory than the initial set's), as a pool of candidates gathered from several
  sources does: only part of it is the target distribution;
- ``--system acac_torsion``: a rare event as the target: 20 configurations from 300 K MD, a pool of 300 K MD
  configurations with 8 % of frames from a scan of a C–C–C–O dihedral angle over 1–177°, tested on the scan's
  other frames; the data set's 300 K and 600 K MD frames stay within 30° and 55° of it (measured), so the pool
  arms are the ones to run;
- ``--system ethanol`` (``configs/active_ethanol_xtb.yaml``): 20 rMD17 ethanol configurations, exploration at
  the data's own 500 K, rMD17 test configurations, a pool of rMD17 training configurations.

Everything is relabelled by GFN2-xTB (tblite), so training, test and calls share one level of theory. Arms:

- MD exploration (Langevin, two walkers), labelling where the rule fires: ``force_std`` (max per-atom force std
  above a threshold: by default, per seed, the 0.9 quantile of the initial model's stds over the pool's
  unlabelled candidates, ``--threshold-quantile``), ``calibrated`` (P(|force error| > tolerance) above one half, scale learned from the
  residuals), ``random`` (each MD step with a fixed probability);
- pool exploration: ``top_k`` (most uncertain first) and ``random`` (uniform), a batch of candidates per update.

The posterior is SG-MCMC (updates continue the chain) or a deep ensemble (updates fine-tune the members),
``--method``. Every arm runs with ``--seeds`` (initial set, walkers' thermostats, model and sampler all follow the seed). A
control repeats the MD runs' updates without new data (seed 0): how much of the improvement is more sampling
rather than the new labels. ``--divergence N`` adds the high-temperature test of the MD stop rule: N trajectories
from the initial model at ``--hot-K`` with and without the force-std stop rule, counting those that reach an
unphysical structure (two atoms closer than 0.6 Å, or a fragment split off the molecule's bond graph).

Reported: learning curves (test force and energy MAE against reference calls, seed mean and range;
``docs/active_learning_<system>_<method>.png``), the calls each uncertainty rule needs to reach the test force MAE that random
selection reaches at its final budget (the call ratio: rule calls / random's calls, from the seed-mean curves and
per seed), wall-clock per call and the loop's own overhead. The numbers go with the date and code version to
``docs/study_active.json`` (one record per system and method) and the section of ``docs/active_learning.md`` is
written from that record (``--report``: from the file alone). Finished runs are reused and unfinished ones
resumed, so an interrupted study continues where it stopped.

    OMP_NUM_THREADS=1 python scripts/study_active.py [--system acac|acac_mixed|acac_torsion|ethanol] [--method sgmcmc|ensemble]
        [--calls 40] [--seeds 0 1 2] [--divergence 10] [--runs runs/study_active] [--report]
"""

import argparse
import json
import logging
import os
import statistics
import time
from datetime import date
from pathlib import Path

import ase.io
import numpy as np
from _harness import stamped, update_section
from nequip.utils.global_state import set_global_state

from mlip_uq.active import ActiveLoop, load_active_config, run_active
from mlip_uq.active.config import ActiveConfig
from mlip_uq.active.explore import pool_uncertainty
from mlip_uq.data import read_frames
from mlip_uq.evaluate import metrics_and_plots, predict_graphs
from mlip_uq.files import atomic_write, write_json
from mlip_uq.posterior import load_posterior
from mlip_uq.stability import bond_fragments, unphysical
from mlip_uq.uq.plots import new_figure, save_figure
from mlip_uq.uq.signals import atom_signal

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HEADING = "## Study: reference calls vs test force error, {system}, {method} (scripts/study_active.py)"
RECORDS = ROOT / "docs" / "study_active.json"  # one record per system/method
SYSTEMS = {
    "acac": {"config": ROOT / "configs" / "active_acac_xtb.yaml", "pool": DATA / "botnet_acac" / "train_600K.xyz",
             "words": "acetylacetone: 20 initial configurations from 300 K MD, MD exploration at 600 K, test and "
                      "pool configurations from 600 K MD"},
    # the acac protocol with a pool that is not all target distribution: 300 K and 600 K MD frames, as many of each
    # (the 300 K ones from another trajectory than the initial set's)
    "acac_mixed": {"config": ROOT / "configs" / "active_acac_xtb.yaml",
                   "pool": [(DATA / "botnet_acac" / "test_MD_300K.xyz", "0:500"),
                            (DATA / "botnet_acac" / "train_600K.xyz", ":")],
                   "words": "acetylacetone: 20 initial configurations from 300 K MD, MD exploration at 600 K, test "
                            "configurations from 600 K MD, a pool of 300 K and 600 K MD configurations (half each)"},
    # a rare event: rotation about a C-C bond, beyond what 300 K MD reaches; the pool is 300 K MD frames (another
    # trajectory than the initial set's) and every other frame of the dihedral scan (1-177 degrees in 4-degree
    # steps), 8 % of it; the test set is the scan's other frames
    "acac_torsion": {"config": ROOT / "configs" / "active_acac_xtb.yaml",
                     "pool": [(DATA / "botnet_acac" / "test_MD_300K.xyz", "0:276"),
                              (DATA / "botnet_acac" / "test_dihedral.xyz", "0::2")],
                     "test": {"path": str(DATA / "botnet_acac" / "test_dihedral.xyz"), "index": "1::2"},
                     "words": "acetylacetone: 20 initial configurations from 300 K MD; a pool of 276 300 K MD "
                              "configurations and 23 frames of a scan of the dihedral angle about a C-C bond (every "
                              "other one of the 45, 1-177 degrees); the test set is the scan's other 22 frames"},
    "ethanol": {"config": ROOT / "configs" / "active_ethanol_xtb.yaml",
                "pool": DATA / "rmd17" / "rmd17_ethanol_train_01.extxyz",
                "words": "rMD17 ethanol: 20 initial configurations, MD exploration at 500 K, rMD17 test and "
                         "training configurations as test set and pool"},
}
RANDOM_OF = {"md_force_std": "md_random", "md_calibrated": "md_random", "pool_top_k": "pool_random"}


#: the members' training (first fit, and every update with --retrain); a fine-tuning starts at a tenth of its lr
ENSEMBLE_TRAINING = {"max_epochs": 150, "batch_size": 5, "lr": 0.01, "lr_patience": 10, "patience": 30}


def pool_explore(args) -> dict:
    return {"kind": "pool", "batch": args.batch, "pool": {"path": str(pool_path(args)), "n": args.pool}}


def pool_path(args) -> Path:
    """The system's pool file; a pool of several parts, each (file, frames index), is written once to
    ``<runs>/<system>/pool.extxyz``."""
    sources = SYSTEMS[args.system]["pool"]
    if isinstance(sources, Path):
        return sources
    path = args.runs / args.system / "pool.extxyz"
    if not path.is_file():
        frames = [atoms for source, index in sources for atoms in read_frames(source, index=index, require=())]
        with atomic_write(path) as tmp:
            ase.io.write(tmp, frames, format="extxyz")
    return path


def test_size(args) -> int:
    """How many test structures the study's runs have: ``--test``, or fewer where the test source has fewer."""
    section = study_config(args, {}, NEVER, seed=0).test
    return min(args.test, len(read_frames(section.path, index=section.index, require=())))


def arms(args, threshold: float):
    """name -> (explore section changes, rule); ``threshold``: the force-std rule's, eV/Å."""
    pool = pool_explore(args)
    return {
        "md_force_std": ({}, {"kind": "force_std", "threshold": threshold, "signal": args.signal}),
        "md_calibrated": ({}, {"kind": "calibrated", "tolerance": args.tolerance, "probability": 0.5}),
        "md_random": ({}, {"kind": "random", "probability": args.probability}),
        "pool_top_k": (pool, {"kind": "top_k", "signal": args.signal}),
        "pool_random": (pool, {"kind": "random"}),
    }


#: a rule that never fires (the configurations that only train, or that are read for their other sections)
NEVER = {"kind": "force_std", "threshold": 1e6}


def study_config(args, explore, rule, seed: int) -> ActiveConfig:
    """The system's configuration with the study's CPU settings, one arm's explorer and rule, and ``seed``."""
    cfg = load_active_config(SYSTEMS[args.system]["config"]).to_dict()
    cfg["seed"] = seed
    cfg["train"]["seed"] = seed
    cfg["test"] = dict(SYSTEMS[args.system].get("test", cfg["test"]), n=args.test)
    cfg["budget"] = {"max_calls": args.calls, "target_forces_mae": None}
    cfg["explore"]["steps"] = args.md_steps
    if explore:
        cfg["explore"] = explore
    cfg["rule"] = rule
    if args.method == "sgmcmc":
        cfg["update"] = {"settle_steps": 40, "n_samples": 4}
        cfg["train"]["sgmcmc"].update(burnin_steps=800, n_samples=4)
    elif args.method == "sgmcmc_starts":  # 4 starts, each a MAP fit as an ensemble member's, sampled locally;
        # each update continues every start's chain on the grown set
        cfg["update"] = {"settle_steps": 300, "n_samples": 4}
        cfg["train"]["sgmcmc"].update(n_starts=4, n_processes=2, init="map", prior={"scale": 1.0, "center": "map"},
                                      lr=1e-4, burnin_steps=300, preheat_steps=50, n_samples=4)
        cfg["train"]["training"] = dict(ENSEMBLE_TRAINING)
    else:  # 4 members trained on the initial set, each update fine-tunes them on the grown one
        cfg["train"].pop("sgmcmc", None)
        cfg["train"].update(method="ensemble", ensemble={"n_members": 4}, training=dict(ENSEMBLE_TRAINING))
        cfg["update"] = {"max_epochs": args.update_epochs, "lr": args.update_lr, "retrain": args.retrain}
    return load_active_config(cfg)


def initial_model(args, runs, seed: int) -> ActiveLoop:
    """The seed's first fit (what every arm of the seed starts from), without exploration calls; its explorer is
    the pool arms' (same candidates)."""
    out = runs / "initial" / f"seed{seed}"
    cfg = study_config(args, pool_explore(args), {"kind": "top_k"}, seed).with_values({"budget.max_calls": 0})
    loop = ActiveLoop(cfg, out, resume=(out / "state.json").is_file())
    loop.run()  # labels the initial and test sets, fits, stops: budget of 0 calls used
    return loop


def rule_threshold(args, runs, seed: int) -> float:
    """The force-std rule's threshold (eV/Å): ``--threshold``, or the ``--threshold-quantile`` quantile of the
    seed's initial model's per-structure max ``--signal`` over the pool's unlabelled candidates, so that
    the rule fires on structures the first model is less sure of than of most of the target distribution
    (a fixed number fires at every step or never, depending on how much data the first model had)."""
    if args.threshold is not None:
        return args.threshold
    path = runs / "initial" / f"seed{seed}" / f"threshold_{args.signal}.json"
    if not path.is_file():
        loop = initial_model(args, runs, seed)
        _, stds, epistemic = pool_uncertainty(loop.posterior(), loop.explorer.graphs())
        per_structure = np.array([float(atom_signal(args.signal, s, e).max()) for s, e in zip(stds, epistemic)])
        write_json({"quantile": args.threshold_quantile, "signal": args.signal,
                    "threshold": float(np.quantile(per_structure, args.threshold_quantile)),
                    "pool_max_signal": per_structure.tolist()}, path)
    saved = json.loads(path.read_text())
    if saved["quantile"] != args.threshold_quantile:
        raise SystemExit(f"{path} was written for --threshold-quantile {saved['quantile']}; delete it to change it")
    return saved["threshold"]


def run_arm(cfg, out: Path):
    summary = out / "summary.json"
    if summary.is_file() and json.loads(summary.read_text())["stop_reason"]:
        return json.loads(summary.read_text())
    run_active(cfg, out, resume=(out / "state.json").is_file())
    return json.loads(summary.read_text())


def control(args, runs):
    """The confound of the MD runs, measured: the first fit, then as many updates as the MD runs make, on the
    initial set alone (no new data). The settle steps alternate between 40 and 41 so that each continuation is a
    new round of ``continue_sgmcmc`` (a call with the same data and arguments is a no-op by design)."""
    out = runs / "control_no_new_data"
    path = out / "control.json"
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    cfg = study_config(args, {}, NEVER, seed=0).with_values({"budget.max_calls": 0})
    loop = ActiveLoop(cfg, out, resume=(out / "state.json").is_file())
    loop.run()  # labels the initial and test sets, fits, stops: budget of 0 calls used
    train, val = loop.training_sets()
    metadata = {"energy_references": loop.energy_references()}
    history = [dict(loop.state.history[0])]
    for k in range(1, args.calls + 1):
        loop.updater.settle_steps = 40 + k % 2
        posterior = load_posterior(loop.updater.fit(train, val, k, False, metadata))
        metrics = metrics_and_plots(predict_graphs(posterior, loop.test_graphs()))
        history.append({"update": k, "calls_initial": history[0]["calls_initial"], "calls_explore": k,
                        "forces_mae": metrics["forces_mae"], "energy_mae": metrics["energy_mae"]})
        logging.info("control update %d: test forces MAE %.4f eV/Å", k, metrics["forces_mae"])
    result = {"history": history, "seconds": time.perf_counter() - start}
    path.write_text(json.dumps(result, indent=1))
    return result


def value_at(history, calls, key="forces_mae"):
    """``key`` (meV/Å, meV/atom) of the last update made with at most ``calls`` exploration calls."""
    rows = [h for h in history if h["calls_explore"] <= calls]
    return 1000 * rows[-1][key] if rows else float("nan")


def curve(per_seed, calls, key="forces_mae"):
    """(n_seeds, calls + 1) array: ``key`` after 0, 1, ..., ``calls`` exploration calls, one row per seed."""
    return np.array([[value_at(s["history"], c, key) for c in range(calls + 1)] for s in per_seed.values()])


def calls_to_reach(values: np.ndarray, target: float) -> float:
    """The first number of calls at which ``values`` (one per call count) is at or below ``target`` (NaN: never)."""
    hits = np.flatnonzero(values <= target)
    return float(hits[0]) if len(hits) else float("nan")


def call_ratios(results, calls):
    """For every uncertainty arm: the calls it needs to reach its random baseline's final test force MAE, as a
    fraction of random's ``calls``: from the seed-mean curves, and per seed against the random run of the same
    seed (the same initial set). Both arms must have run the same seeds."""
    out = {}
    for name, baseline in RANDOM_OF.items():
        if name not in results or baseline not in results:
            continue
        random_final = curve(results[baseline], calls)[:, -1]
        target = float(np.nanmean(random_final))
        mean_curve = np.nanmean(curve(results[name], calls), axis=0)
        # per seed, paired: the same seed's initial set and random run
        per_seed = [calls_to_reach(row, final) / calls
                    for row, final in zip(curve(results[name], calls), random_final)]
        out[name] = {"baseline": baseline, "target_mev_per_a": target,
                     "ratio": calls_to_reach(mean_curve, target) / calls, "per_seed": per_seed}
    return out


def fraction(x: float) -> str:
    return "never" if not np.isfinite(x) else f"{x:.2f}"


def divergence(args, runs, threshold: float):
    """The stop rule at high temperature: ``args.divergence`` MD trajectories of the initial model (seed 0's first
    fit) at ``args.hot_k`` K, with and without the force-std stop rule at ``threshold`` eV/Å, and how many
    reached an unphysical structure (before the rule stopped them)."""
    from mlip_uq import UQCalculator
    from mlip_uq.md import ForceStdRule, run_md

    path = runs / "divergence" / "divergence.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = runs / "divergence"
    posterior = initial_model(args, runs, seed=0).posterior()
    starts = ase.io.read(study_config(args, {}, NEVER, seed=0).explore.starts.path, index=":")
    result = {"temperature_K": args.hot_k, "steps": args.hot_steps, "threshold": threshold, "runs": []}
    for i in range(args.divergence):
        atoms0 = starts[(i * 37) % len(starts)]
        components = bond_fragments(atoms0)
        for with_rule in (False, True):
            atoms = atoms0.copy()
            atoms.calc = None
            run_dir = out / f"traj{i}_{'rule' if with_rule else 'free'}"
            md = run_md(atoms, UQCalculator(posterior), args.hot_steps, timestep_fs=0.5, temperature_K=args.hot_k,
                        out_dir=run_dir, stop_rule=ForceStdRule(threshold) if with_rule else None, log_every=10,
                        seed=i, progress=False, uq_every=10)
            if md.collapsed:  # the dynamics moved two atoms onto each other
                entry = {"steps_done": md.steps_done, "stopped": False, "unphysical_frame": "collapsed",
                         "error": md.stop_reason}
            else:
                frames = ase.io.read(md.trajectory_path, index=":")
                bad = next((k for k, frame in enumerate(frames) if unphysical(frame, components)), None)
                entry = {"steps_done": md.steps_done, "stopped": md.stopped, "unphysical_frame": bad}
            result["runs"].append({"trajectory": i, "rule": with_rule, **entry})
            logging.info("hot MD %d, rule %s: %s", i, with_rule, entry)
    path.write_text(json.dumps(result, indent=1))
    return result


def plot(results, no_new_data, calls, path):
    kinds = [(prefix, title) for prefix, title in (("md_", "MD exploration"), ("pool_", "candidate pool"))
             if any(name.startswith(prefix) for name in results)]  # a panel per exploration kind that was run
    fig = new_figure(5.0 * len(kinds), 7.0)
    axes = fig.subplots(2, len(kinds), sharex=True, squeeze=False)
    for col, (prefix, title) in enumerate(kinds):
        for row, (key, unit) in enumerate((("forces_mae", "test force MAE (meV/Å)"),
                                           ("energy_mae", "test energy MAE (meV/atom)"))):
            ax = axes[row, col]
            for name, per_seed in results.items():
                if not name.startswith(prefix):
                    continue
                values = curve(per_seed, calls, key)
                x = np.arange(calls + 1)
                line, = ax.plot(x, np.nanmean(values, axis=0), label=f"{name.removeprefix(prefix).replace('_', ' ')} "
                                f"({len(values)} seeds)", linestyle="--" if "random" in name else "-")
                ax.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=line.get_color(),
                                alpha=0.15)
            if prefix == "md_" and no_new_data:
                h = no_new_data["history"]
                ax.plot([r["calls_explore"] for r in h], [1000 * r[key] for r in h], color="grey", linestyle=":",
                        label="no new data (same updates, seed 0)")
            ax.set_title(title if row == 0 else "")
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("reference calls during exploration")
        axes[0, col].legend(fontsize=7)
    return save_figure(fig, path)


def spread(values) -> str:
    """Mean ± standard deviation of the finite ``values``."""
    values = [v for v in values if np.isfinite(v)]
    return f"{statistics.mean(values):.1f} ± {statistics.pstdev(values):.1f}" if values else "–"


def table_rows(results, args, checkpoints, thresholds) -> list:
    """Per arm, the numbers of its table row: per-seed force MAE at each checkpoint, energy MAE at the last,
    MD steps and seconds per exploration call per seed, mean reference-call seconds and bookkeeping per decision."""
    rules = {"md_force_std": "force std > " + ", ".join(f"{t:.3f}" for t in thresholds.values()) + " eV/Å",
             "md_calibrated": f"P(err > {args.tolerance} eV/Å) > 0.5",
             "md_random": f"random, p = {args.probability}/step", "pool_top_k": f"top {args.batch} of the pool",
             "pool_random": f"random {args.batch}"}
    rows = []
    for name, per_seed in results.items():
        summaries = list(per_seed.values())
        rows.append({
            "run": name, "rule": rules[name], "seeds": len(summaries),
            "forces_mae": [[value_at(s["history"], c) for s in summaries] for c in checkpoints],
            "energy_mae": [value_at(s["history"], checkpoints[-1], "energy_mae") for s in summaries],
            "md_steps": [s["md_steps"] for s in summaries if s["md_steps"]],
            "seconds_per_call": [s["timings_s"]["total"] / s["history"][-1]["calls_explore"] for s in summaries
                                 if s["history"][-1]["calls_explore"]],  # an arm whose rule never fired: "–"
            "reference_call_s": statistics.mean(s["timings_s"]["oracle"] / max(1, s["history"][-1]["calls_initial"]
                                                                                + s["history"][-1]["calls_explore"])
                                                for s in summaries),
            "bookkeeping_ms": statistics.mean(1000 * s["bookkeeping_per_decision_s"] for s in summaries)})
    return rows


def table(record) -> str:
    checkpoints = record["checkpoints"]
    head = ("| run | rule | seeds | " + " | ".join(f"force MAE @ +{c}" for c in checkpoints)
            + " | energy MAE @ +{0} | MD steps | s per call (total / calls) | reference call (s) | bookkeeping / "
              "decision (ms) |".format(checkpoints[-1]))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in record["rows"]:
        maes = " | ".join(spread(values) for values in r["forces_mae"])
        md_steps = f"{statistics.mean(r['md_steps']):.0f}" if r["md_steps"] else "—"
        lines.append(f"| {r['run']} | {r['rule']} | {r['seeds']} | {maes} | {spread(r['energy_mae'])} | {md_steps} | "
                     f"{spread(r['seconds_per_call'])} | {r['reference_call_s']:.3f} | {r['bookkeeping_ms']:.0f} |")
    return "\n".join(lines)


def report(record: dict, key: str) -> str:
    """The section's body from the record alone (``docs/study_active.json`` under ``key``)."""
    body = [record["setup"], "", f"![test MAE vs reference calls]({record['plot']})", "", table(record)]
    if record["call_ratios"]:
        body += ["", "**Call ratio** (calls an uncertainty rule needs to reach the test force MAE its random "
                 "baseline reaches with all its calls, / that number of calls; target <= 0.5):", ""]
        for name, r in record["call_ratios"].items():
            seeds = ", ".join(fraction(x) for x in r["per_seed"])
            body.append(f"- {name} vs {r['baseline']} (target {r['target_mev_per_a']:.1f} meV/Å): "
                        f"{fraction(r['ratio'])} from the seed-mean curves; per seed {seeds}.")
    if record["control"] is not None:
        body += ["", "Control (no new data, seed 0): the first fit, then the same number of SG-MCMC updates on the "
                 "initial set only: test force MAE " + ", ".join(f"{v:.1f}" for v in record["control"])
                 + " meV/Å after " + ", ".join(str(c) for c in record["checkpoints"]) + " updates."]
    for hot in record["divergence"]:
        rule = (f"with the stop rule (force std > {hot['threshold']:.3f} eV/Å)" if hot["rule"] else
                "without a stop rule")
        body += ["", f"High-temperature MD ({hot['temperature_K']:.0f} K, {hot['steps']} steps of 0.5 fs, initial "
                 f"model), {rule}: {hot['unphysical']} of {hot['runs']} trajectories reached an unphysical structure"
                 + (f", {hot['stopped']} stopped by the rule" if hot["rule"] else "") + "."]
    body += ["", f"Code version: {record['code_version']}. Numbers: [{RECORDS.name}]({RECORDS.name}) (`{key}`)."]
    return "\n".join(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=sorted(SYSTEMS), default="acac")
    parser.add_argument("--calls", type=int, default=40, help="reference calls per run during exploration")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--method", choices=["sgmcmc", "sgmcmc_starts", "ensemble"], default="sgmcmc",
                        help="posterior and updates (sgmcmc_starts: the several-basin recipe, 4 starts)")
    parser.add_argument("--threshold", type=float, help="force_std rule threshold (eV/Å; default: per seed, from "
                        "the initial model, --threshold-quantile)")
    parser.add_argument("--threshold-quantile", type=float, default=0.9,
                        help="the force_std threshold's quantile of the initial model's pool stds")
    parser.add_argument("--signal", choices=["epistemic", "total", "bald"], default="epistemic",
                        help="the per-atom uncertainty the force_std and top_k rules read (mlip_uq.uq.signals)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="calibrated rule tolerance (eV/Å)")
    parser.add_argument("--probability", type=float, default=0.02, help="random MD rule: calls per step")
    parser.add_argument("--md-steps", type=int, default=3000, help="MD steps per walker (at most)")
    parser.add_argument("--pool", type=int, default=300, help="pool size")
    parser.add_argument("--batch", type=int, default=4, help="pool candidates per update")
    parser.add_argument("--test", type=int, default=100, help="test structures")
    parser.add_argument("--update-epochs", type=int, default=20, help="ensemble: fine-tuning epochs per update")
    parser.add_argument("--update-lr", type=float, help="ensemble: the fine-tuning's initial learning rate "
                        "(default: update.lr's, a tenth of the training's)")
    parser.add_argument("--retrain", action="store_true", help="ensemble: retrain the members at every update")
    parser.add_argument("--only", nargs="+", help="run only these arms")
    parser.add_argument("--divergence", type=int, default=0, help="high-temperature MD trajectories per variant")
    parser.add_argument("--hot-k", type=float, default=1200.0, help="temperature of the divergence test (K)")
    parser.add_argument("--hot-steps", type=int, default=2000, help="MD steps of each divergence trajectory")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study_active")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "active_learning.md")
    parser.add_argument("--report", action="store_true",
                        help="rewrite the sections of the records this script wrote from docs/study_active.json alone")
    args = parser.parse_args()
    if args.report:
        for key, record in json.loads(RECORDS.read_text()).items():
            if "source" not in record:  # transcribed records (``source``) have no section of this script's form
                system, method = key.split("/")
                update_section(args.doc, HEADING.format(system=system, method=method), report(record, key))
        return
    if not 0.0 < args.threshold_quantile < 1.0:
        parser.error(f"--threshold-quantile must be between 0 and 1, got {args.threshold_quantile}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_global_state()
    runs = args.runs / args.system / args.method
    thresholds = {seed: rule_threshold(args, runs, seed) for seed in args.seeds}
    logging.info("force-std rule thresholds per seed: %s eV/Å", thresholds)
    per_seed = {seed: arms(args, thresholds[seed]) for seed in args.seeds}
    results = {}
    for name in per_seed[args.seeds[0]]:
        if args.only and name not in args.only:
            continue
        results[name] = {}
        for seed in args.seeds:
            logging.info("=== %s, seed %d ===", name, seed)
            explore, rule = per_seed[seed][name]
            results[name][seed] = run_arm(study_config(args, explore, rule, seed), runs / name / f"seed{seed}")
    no_new_data = None if args.only or args.method != "sgmcmc" else control(args, runs)
    hot = divergence(args, runs, rule_threshold(args, runs, seed=0)) if args.divergence else None
    minutes = (sum(s["timings_s"]["total"] for per_seed in results.values() for s in per_seed.values())
               + (no_new_data["seconds"] if no_new_data else 0.0)) / 60
    png = plot(results, no_new_data, args.calls,
               args.doc.with_name(f"{args.doc.stem}_{args.system}_{args.method}.png"))
    checkpoints = sorted({0, args.calls // 4, args.calls // 2, args.calls})
    ratios = call_ratios(results, args.calls)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    write_json({"ratios": ratios, "divergence": hot}, runs / "study.json")
    only = f" --only {' '.join(args.only)}" if args.only else ""
    command = (f"OMP_NUM_THREADS={threads} python scripts/study_active.py --system {args.system} --method "
               f"{args.method} --calls {args.calls} --seeds {' '.join(map(str, args.seeds))}"
               f"{f' --divergence {args.divergence}' if args.divergence else ''}"
               f"{f' --batch {args.batch}' if args.batch != parser.get_default('batch') else ''}"
               f"{' --retrain' if args.retrain else ''}{only}")
    setup = (
        f"Measured {date.today().isoformat()} with `{command}` on the 2-core CPU machine "
        f"({minutes:.0f} min of runs). {SYSTEMS[args.system]['words']}; every label GFN2-xTB. Test set: "
        f"{test_size(args)} structures. "
        + ("SG-MCMC (one chain, 800 burn-in steps, 4 samples; each update 40 re-equilibration steps and 4 new "
           "samples)" if args.method == "sgmcmc" else
           "SG-MCMC over 4 starts (each a MAP fit of at most 150 epochs on the initial set, as an ensemble member, "
           "then 300 burn-in steps at η = 1e-4 and 4 samples around it; each update 300 re-equilibration steps and "
           f"4 new samples per start; rules read the {args.signal} signal)" if args.method == "sgmcmc_starts" else
           "A deep ensemble of 4 members (150 epochs at most on the initial set; "
           + ("each update retrains every member afresh on the grown set, as the first fit)" if args.retrain else
              f"each update fine-tunes every member for {args.update_epochs} epochs, starting at a learning rate of "
              f"{args.update_lr or ENSEMBLE_TRAINING['lr'] / 10})"))
        + f"; {args.calls} reference calls during exploration per run. Force "
        "MAE in meV/Å, energy MAE in meV/atom: seed mean ± standard deviation after +N exploration calls.")
    divergence_rows = [] if hot is None else [
        {"rule": with_rule, "threshold": hot["threshold"], "temperature_K": hot["temperature_K"],
         "steps": hot["steps"], "runs": sum(r["rule"] == with_rule for r in hot["runs"]),
         "unphysical": sum(r["unphysical_frame"] is not None for r in hot["runs"] if r["rule"] == with_rule),
         "stopped": sum(r["stopped"] for r in hot["runs"] if r["rule"] == with_rule)}
        for with_rule in (False, True)]
    record = stamped({
        "command": command, "minutes": minutes, "setup": setup, "plot": png.name, "checkpoints": checkpoints,
        "thresholds_eV_per_A": {str(k): v for k, v in thresholds.items()},
        "rows": table_rows(results, args, checkpoints, thresholds), "call_ratios": ratios,
        "control": None if no_new_data is None else [value_at(no_new_data["history"], c) for c in checkpoints],
        "divergence": divergence_rows})
    key = f"{args.system}/{args.method}"
    records = json.loads(RECORDS.read_text()) if RECORDS.is_file() else {}
    records[key] = record
    write_json(records, RECORDS)
    update_section(args.doc, HEADING.format(system=args.system, method=args.method), report(record, key))
    print(report(record, key))


if __name__ == "__main__":
    main()
