"""Data efficiency of uncertainty-triggered vs random relabelling on ethanol, GFN2-xTB as the reference.

Five active-learning runs of ``configs/active_ethanol_xtb.yaml`` (20 initial rMD17 configurations relabelled by
GFN2-xTB, a small SG-MCMC NequIP model, a test set of rMD17 test configurations relabelled by GFN2-xTB), each
stopped after the same number of reference calls:

- MD exploration (Langevin, 500 K, two walkers), labelling where the rule fires:
  ``force_std`` (max per-atom force std above a threshold), ``calibrated`` (P(|force error| > tolerance) above
  one half, scale learned from the residuals), ``random`` (each MD step with a fixed probability);
- pool exploration (rMD17 training configurations not in the initial set): ``top_k`` (most uncertain first) and
  ``random`` (uniform), a batch of candidates per update.

A control repeats the MD runs' updates without new data (the first fit, then as many SG-MCMC continuations on
the initial set): how much of the improvement is more sampling rather than the new labels.

After every update the test force MAE is recorded; the script plots MAE against the number of reference calls
(``docs/active_learning.png``) and writes a table (and the loop overhead) into ``docs/active_learning.md``.
Finished runs are reused and unfinished ones resumed, so an interrupted study continues where it stopped.

    OMP_NUM_THREADS=1 python scripts/study_active.py [--calls 20] [--runs runs/study_active]
"""

import argparse
import json
import logging
import os
import time
from datetime import date
from pathlib import Path

from nequip.utils.global_state import set_global_state

from _harness import update_section
from mlip_uq.active import ActiveLoop, load_active_config, run_active
from mlip_uq.evaluate import metrics_and_plots, predict_graphs
from mlip_uq.posterior import load_posterior
from mlip_uq.uq.plots import new_figure, save_figure

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "active_ethanol_xtb.yaml"
HEADING = "## Study: reference calls vs test force error (scripts/study_active.py)"


def arms(args):
    """name -> (explore section changes, rule)."""
    pool = {"kind": "pool", "batch": args.batch,
            "pool": {"path": str(ROOT.parent / "shared/data/rmd17/rmd17_ethanol_train_01.extxyz"), "n": args.pool}}
    return {
        "md_force_std": ({}, {"kind": "force_std", "threshold": args.threshold}),
        "md_calibrated": ({}, {"kind": "calibrated", "tolerance": args.tolerance, "probability": 0.5}),
        "md_random": ({}, {"kind": "random", "probability": args.probability}),
        "pool_top_k": (pool, {"kind": "top_k"}),
        "pool_random": (pool, {"kind": "random"}),
    }


def study_config(args, explore, rule):
    """The ethanol configuration with the study's (smaller) CPU settings and one arm's explorer and rule."""
    cfg = load_active_config(CONFIG)
    cfg["test"]["n"] = args.test
    cfg["budget"] = {"max_calls": args.calls, "target_forces_mae": None}
    cfg["explore"]["steps"] = args.md_steps
    if explore:
        cfg["explore"] = explore
    cfg["rule"] = rule
    cfg["update"] = {"settle_steps": 40, "n_samples": 4}
    cfg["train"]["sgmcmc"].update(burnin_steps=800, n_samples=4)
    return cfg


def run_arm(name, cfg, runs):
    out = runs / name
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
    cfg = study_config(args, {}, {"kind": "force_std", "threshold": 1e6})
    cfg["budget"]["max_calls"] = 0
    loop = ActiveLoop(cfg, out, resume=(out / "state.json").is_file())
    loop.run()  # labels the initial and test sets, fits, stops: budget of 0 calls used
    train, val = loop._training_sets()
    metadata = {"energy_references": loop._data()[0].energy_references}
    history = [dict(loop.state.history[0])]
    for k in range(1, args.calls + 1):
        loop.updater.settle_steps = 40 + k % 2
        posterior = load_posterior(loop.updater.fit(train, val, k, False, metadata))
        metrics = metrics_and_plots(predict_graphs(posterior, loop._test()))
        history.append({"update": k, "calls_initial": history[0]["calls_initial"], "calls_explore": k,
                        "forces_mae": metrics["forces_mae"], "energy_mae": metrics["energy_mae"]})
        logging.info("control update %d: test forces MAE %.4f eV/Å", k, metrics["forces_mae"])
    result = {"history": history, "seconds": time.perf_counter() - start}
    path.write_text(json.dumps(result, indent=1))
    return result


def mae_at(history, calls):
    """Test force MAE (meV/Å) of the last update made with at most ``calls`` exploration calls."""
    rows = [h for h in history if h["calls_explore"] <= calls]
    return 1000 * rows[-1]["forces_mae"] if rows else float("nan")


def plot(results, no_new_data, path):
    fig = new_figure(10.0, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, prefix, title in ((axes[0], "md_", "MD exploration"), (axes[1], "pool_", "candidate pool")):
        for name, summary in results.items():
            if not name.startswith(prefix):
                continue
            h = summary["history"]
            calls = [r["calls_initial"] + r["calls_explore"] for r in h]
            ax.plot(calls, [1000 * r["forces_mae"] for r in h], marker="o", ms=3,
                    label=name.removeprefix(prefix).replace("_", " "),
                    linestyle="--" if "random" in name else "-")
        if prefix == "md_" and no_new_data:
            h = no_new_data["history"]
            ax.plot([r["calls_initial"] + r["calls_explore"] for r in h], [1000 * r["forces_mae"] for r in h],
                    color="grey", linestyle=":", marker="x", ms=3, label="no new data (same updates)")
        ax.set_title(title)
        ax.set_xlabel("reference calls (GFN2-xTB labels in the training set)")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test force MAE (meV/Å)")
    return save_figure(fig, path)


def table(results, args, checkpoints):
    head = ("| run | rule | MD steps | calls / MD step | " + " | ".join(f"MAE @ +{c}" for c in checkpoints)
            + " | total (s) | reference calls (s) | updates (s) | exploration (s) | test eval (s) | bookkeeping (s) "
            "| bookkeeping / decision (ms) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in results.items():
        t = s["timings_s"]
        fraction = s["fraction_md_steps_with_call"]
        rule = {"md_force_std": f"force std > {args.threshold} eV/Å",
                "md_calibrated": f"P(err > {args.tolerance} eV/Å) > 0.5",
                "md_random": f"random, p = {args.probability}/step",
                "pool_top_k": f"top {args.batch} of the pool", "pool_random": f"random {args.batch}"}[name]
        maes = " | ".join(f"{mae_at(s['history'], c):.1f}" for c in checkpoints)
        lines.append(
            f"| {name} | {rule} | {s['md_steps'] or '—'} | {'—' if fraction is None else f'{fraction:.3f}'} | {maes} "
            f"| {t['total']:.0f} | {t['oracle']:.1f} | {t['update']:.0f} | {t['explore']:.0f} | {t['evaluate']:.0f} "
            f"| {s['bookkeeping_s']:.1f} | {1000 * s['bookkeeping_per_decision_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="reference calls per run during exploration")
    parser.add_argument("--threshold", type=float, default=0.06, help="force_std rule threshold (eV/Å)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="calibrated rule tolerance (eV/Å)")
    parser.add_argument("--probability", type=float, default=0.02, help="random MD rule: calls per step")
    parser.add_argument("--md-steps", type=int, default=3000, help="MD steps per walker (at most)")
    parser.add_argument("--pool", type=int, default=300, help="pool size")
    parser.add_argument("--batch", type=int, default=4, help="pool candidates per update")
    parser.add_argument("--test", type=int, default=100, help="test structures")
    parser.add_argument("--only", nargs="+", help="run only these arms")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study_active")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "active_learning.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_global_state()
    results = {}
    for name, (explore, rule) in arms(args).items():
        if args.only and name not in args.only:
            continue
        logging.info("=== %s ===", name)
        results[name] = run_arm(name, study_config(args, explore, rule), args.runs)
    no_new_data = None if args.only else control(args, args.runs)
    minutes = (sum(s["timings_s"]["total"] for s in results.values())
               + (no_new_data["seconds"] if no_new_data else 0.0)) / 60
    png = plot(results, no_new_data, args.doc.with_suffix(".png"))
    checkpoints = sorted({0, args.calls // 4, args.calls // 2, args.calls})
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    finals = {n: s["history"][-1] for n, s in results.items()}
    body = (
        f"Measured {date.today().isoformat()} with `OMP_NUM_THREADS={threads} python scripts/study_active.py "
        f"--calls {args.calls}` on the 2-core CPU machine, one thread (shared with other jobs: times are upper "
        f"bounds); CPU budget: {minutes:.0f} min of wall time for the runs and the control together. Every run: 20 initial rMD17 ethanol configurations relabelled by GFN2-xTB, a test set of "
        f"{args.test} rMD17 test configurations relabelled by GFN2-xTB, SG-MCMC (one chain, 800 burn-in steps, 4 "
        f"samples; each update 40 re-equilibration steps and 4 new samples), {args.calls} reference calls during "
        f"exploration. MAE columns: test force MAE (meV/Å) after +N exploration calls. Times in seconds; "
        f"`bookkeeping` is everything besides reference calls, updates, the model's predictions during "
        f"exploration and the test evaluation (state and log writes, store commits, graph building).\n\n"
        f"![test force MAE vs reference calls]({png.name})\n\n"
        + table(results, args, checkpoints)
        + ("" if no_new_data is None else
           "\n\nControl (no new data): the first fit, then the same number of SG-MCMC updates on the initial set "
           "only: test force MAE " + ", ".join(f"{mae_at(no_new_data['history'], c):.1f}" for c in checkpoints)
           + " meV/Å after " + ", ".join(str(c) for c in checkpoints) + " updates.")
        + "\n\nFinal test metrics: "
        + "; ".join(f"{n}: forces MAE {1000 * h['forces_mae']:.1f} meV/Å, energy MAE {1000 * h['energy_mae']:.2f} "
                    f"meV/atom, forces NLL {h['forces_nll']:.3g}" for n, h in finals.items())
        + "."
    )
    update_section(args.doc, HEADING, body)
    print(body)


if __name__ == "__main__":
    main()
