"""Does re-adapting the SG-MCMC preconditioner in an update keep a posterior sane after a label with large forces?

The on-the-fly study (scripts/study_onthefly.py, docs/active_learning.md) saw the 4-start SG-MCMC posterior of
two runs break after one label whose largest force component was 28 and 32 eV/Å, against 2-8 eV/Å for every
other label: test force MAE 8.8 eV/Å (interval arm, seed 1) and 0.51 eV/Å (random arm, seed 0). An update
continues each chain with the preconditioner frozen at the end of the first burn-in, which never saw the
gradient such a structure gives. This experiment repeats those updates from the same first posterior and the
same labels (read from the study's run folders), with ``update.readapt_steps`` 0 (the study's setting) and
``--readapt`` steps, and reports the 600 K test force MAE after each, plus a control run whose labels are all
ordinary (rule arm). One update with all the case's labels at once, from the seed's first posterior (each
case's own run updated once per label).

    OMP_NUM_THREADS=1 python scripts/study_readapt.py [--readapt 100] [--runs runs/study_onthefly/sgmcmc_starts]

Writes docs/study_readapt.json and its section of docs/active_learning.md (``--report``: the section from the
JSON alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
from _harness import stamped, update_section
from nequip.utils.global_state import set_global_state

from mlip_uq.active import load_active_config
from mlip_uq.active.loop import ActiveLoop
from mlip_uq.active.update import Updater
from mlip_uq.data import FrameStore
from mlip_uq.evaluate import metrics_and_plots, predict_graphs
from mlip_uq.files import write_json
from mlip_uq.posterior import load_posterior

ROOT = Path(__file__).resolve().parents[1]
#: (arm, seed, labels after the initial 50 that the update adds: up to and including the large-force one)
CASES = (("interval", 1, 2), ("random", 0, 10), ("random", 1, 7), ("rule", 0, 12))
HEADING = "## Study: re-adapting the preconditioner in an update (scripts/study_readapt.py)"
#: what a case's result records (errors in eV/Å and eV/atom; ``error``: why no error could be computed)
KEYS = ("arm", "seed", "readapt_steps", "n_new", "largest_force_component_eV_per_A", "forces_mae", "energy_mae",
        "error", "n_draws", "diverged_starts")


def update_once(runs: Path, arm: str, seed: int, n_new: int, readapt: int, work: Path) -> dict:
    """Update seed ``seed``'s first posterior once on its initial set plus the arm's first ``n_new`` labels."""
    out = work / f"{arm}_seed{seed}_readapt{readapt}"
    if not (out / "result.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(runs / "initial" / f"seed{seed}", out)
        loop = ActiveLoop(load_active_config(out / "active_config.yaml"), out, resume=True)
        train, val = loop.training_sets()
        first = load_posterior(out / "model" / "posterior.h5")
        store = FrameStore.open(runs / arm / f"seed{seed}" / "labelled.h5")
        new = list(range(len(train) + len(val), len(train) + len(val) + n_new))
        added = store.graphs(new, dtype=loop.dtype)
        settings = loop.train_cfg.settings
        options = dataclasses.replace(loop.cfg.update, readapt_steps=readapt)
        updater = Updater("sgmcmc", first.config, settings, options, out / "model")
        path = updater.fit(train + added, val, index=1, resume=False,
                           metadata=dict(energy_references=first.energy_references))
        posterior = load_posterior(path)
        pred = predict_graphs(posterior, loop.test_graphs(), 16)
        try:
            metrics = metrics_and_plots(pred)
        except ValueError as error:  # a draw that predicts NaN or inf on the test set
            metrics = {"forces_mae": None, "energy_mae": None, "error": str(error)}
        largest = [float(np.abs(a.get_forces()).max()) for a in store.atoms(new)]
        diverged = sorted(int(p.parent.name) for p in (out / "model" / "starts").glob("*/diverged.json"))
        write_json({"arm": arm, "seed": seed, "readapt_steps": readapt, "n_new": n_new,
                    "largest_force_component_eV_per_A": largest, **metrics,
                    "n_draws": posterior.n_samples, "diverged_starts": diverged},
                   out / "result.json")
    result = json.loads((out / "result.json").read_text())
    return {key: result[key] for key in KEYS if key in result}


def cell(result: dict) -> str:
    """A result's force MAE (meV/Å), with the starts left out of the posterior because they diverged."""
    mae = "non-finite predictions" if result["forces_mae"] is None else f"{1000 * result['forces_mae']:.4g}"
    left_out = result["diverged_starts"]
    return mae + (f" ({len(left_out)} of 4 starts diverged)" if left_out else "")


def report(study: dict) -> str:
    lines = [f"Measured {study['date']} (code {study['code_version']}) with `{study['command']}`. One update from "
             "the seed's first posterior (50 structures) on its initial set plus the arm's first labels of the "
             "on-the-fly study; 600 K test force MAE (meV/Å) of the updated posterior (a start whose chain "
             "diverges is left out of it).", "",
             "| case | labels added | largest force component of a new label (eV/Å) | "
             + " | ".join(f"readapt_steps {r}" for r in study["readapt"]) + " |",
             "|---|---|---|" + "---|" * len(study["readapt"])]
    for case in study["cases"]:
        rows = case["results"]
        lines.append(f"| {case['arm']} seed {case['seed']} | {rows[0]['n_new']} | "
                     f"{max(rows[0]['largest_force_component_eV_per_A']):.1f} | "
                     + " | ".join(cell(r) for r in rows) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readapt", type=int, default=100, help="re-adaptation steps of the second variant")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "study_onthefly" / "sgmcmc_starts")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "study_readapt")
    parser.add_argument("--report", action="store_true", help="print the table from the JSON alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = ROOT / "docs" / "study_readapt.json"
    if not args.report:
        set_global_state()
        readapt = [0, args.readapt]
        cases = [{"arm": arm, "seed": seed, "results": [update_once(args.runs, arm, seed, n, r, args.work)
                                                        for r in readapt]}
                 for arm, seed, n in CASES]
        write_json(stamped({"command": "OMP_NUM_THREADS=1 python scripts/study_readapt.py " + " ".join(sys.argv[1:]),
                            "readapt": readapt, "cases": cases}), path)
    text = report(json.loads(path.read_text()))
    update_section(ROOT / "docs" / "active_learning.md", HEADING, text)
    print(text)


if __name__ == "__main__":
    main()
