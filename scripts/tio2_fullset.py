"""How far the TiO2 figures of the bundled subset carry: the subset-trained models of docs/tio2_results.md (the
``--budget cpu`` study, random split) evaluated on the full aenet set's own test split, on the structures inside
the subset's range and on those outside it.

The full set's test split is the one the full-data study draws (``configs/tio2_compare.yaml`` without a budget:
its filter, then its random split with its seed), so these are the structures a full-data model would be tested
on. Structures that are also in the bundled subset (fingerprint distance below ``NEAR_COPY_A``,
:mod:`mlip_uq.data.fingerprints`) are left out: the subset's structures are same-numbered structures of the full
set, and some of them trained the models. The rest are grouped by the subset's range as
``scripts/tio2_ranges.py`` defines it: *inside* (referenced energy per atom inside the subset's, largest force
component not above the subset's), *outside in force only* (the energy inside, a larger force component) and
*outside in energy* (the energy per atom outside the subset's; most of these have larger forces too), and the
three together.

Per model and group: the accuracy (energy per atom, force components) and the force uncertainty before and after
recalibration (the isotonic map ``mlip-uq compare`` fitted on the subset's validation split; *before* means as the
posterior file predicts it), the mean per-atom force std, predictive and epistemic, and the AUROC of telling each
outside group from the inside one by the per-structure max (and mean) per-atom force std
(:func:`mlip_uq.compare.ood_scores`). Beside them the same model's errors on the subset's own 100-structure test
split (``compare.json`` of its run), so the reader sees the same models on both test sets.

    OMP_NUM_THREADS=2 mlip-uq compare configs/tio2_compare.yaml --budget cpu --regimes full --splits random \\
        --methods map sgmcmc_1chain vi ensemble --out runs/tio2_compare_cpu
    python scripts/tio2_fullset.py [--runs runs/tio2_compare_cpu] [--report]

Needs the full set in the data cache (``mlip-uq data fetch tio2_aenet``). Writes docs/tio2/fullset.json with the
date and code version and its section of docs/tio2_results.md (``--report``: the section from the JSON alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _harness import READING, REPO, stamped, stored_reading, update_section

COMPARE = REPO / "configs" / "tio2_compare.yaml"
OUT = REPO / "docs" / "tio2" / "fullset.json"
PAGE = REPO / "docs" / "tio2_results.md"
HEADING = "## Subset-trained models on the full set's test split"
REGIME, SPLIT = "full", "random"
METHODS = ("map", "ensemble", "sgmcmc_1chain", "vi")
OUTSIDE = ("outside_force", "outside_energy")
GROUP_WORDS = {"inside": "inside the range", "outside_force": "outside in force only",
               "outside_energy": "outside in energy", "all": "all three"}


def _test_frames():
    """The full set's test frames as the full-data study draws them, its configuration (``RunConfig``) and their
    indices in the full set."""
    from mlip_uq.compare import load_compare_config, run_config
    from mlip_uq.config import load_config
    from mlip_uq.data import filter_frames, read_frames

    config = load_config(run_config(load_compare_config(COMPARE), REGIME, SPLIT, "map"))
    data = config.data
    frames = read_frames(data.path, keys=data.keys, min_distance=data.min_distance)
    _, keep = filter_frames(frames, data.energy_references, data.filter.max_energy_per_atom, data.filter.max_force)
    kept = np.flatnonzero(keep)
    split = data.split.split([frames[i] for i in kept], config.seed, data.energy_references)
    test = kept[np.asarray(split["test"], dtype=int)]
    return [frames[i] for i in test], config, test


def _groups(test_frames, config, subset_frames) -> tuple[dict, dict]:
    """Test-frame indices per group (``inside``, ``outside_force``, ``outside_energy`` of the subset's range, and
    ``all`` three; copies of subset structures left out of every group) and the counts that say how the groups
    were formed."""
    from tio2_ranges import energy_and_force, outside, ranges

    from mlip_uq.data.fingerprints import NEAR_COPY_A, nearest_distances

    refs = config.data.energy_references
    subset = ranges(*energy_and_force(subset_frames, refs))
    energy, force = energy_and_force(test_frames, refs)
    copies = nearest_distances(test_frames, subset_frames) < NEAR_COPY_A
    low, high = subset["energy_per_atom_eV"]
    energy_out = (energy < low) | (energy > high)
    force_out = force > subset["max_force_component_eV_per_A"]
    groups = {"inside": np.flatnonzero(~copies & ~energy_out & ~force_out),
              "outside_force": np.flatnonzero(~copies & ~energy_out & force_out),
              "outside_energy": np.flatnonzero(~copies & energy_out), "all": np.flatnonzero(~copies)}
    counts = {"test_structures": len(test_frames), "subset_copies_left_out": int(copies.sum()),
              **{name: len(idx) for name, idx in groups.items()},
              "outside_by": outside(energy[~copies], force[~copies], subset),
              "energy_per_atom_eV": {name: [float(energy[idx].min()), float(energy[idx].max())]
                                     for name, idx in groups.items()},
              "max_force_component_eV_per_A": {name: float(force[idx].max()) for name, idx in groups.items()},
              "subset_range": subset}
    return groups, counts


def _subset_frames():
    """The bundled subset's structures, as the study reads them."""
    from mlip_uq.compare import load_compare_config, run_config
    from mlip_uq.config import load_config
    from mlip_uq.data import read_frames

    config = load_config(run_config(load_compare_config(COMPARE, "cpu"), REGIME, SPLIT, "map"))
    return read_frames(config.data.path, keys=config.data.keys)


def outside_frames() -> list:
    """The full set's test structures outside the subset's range (the groups *outside in force only*, then
    *outside in energy*), as ``ase.Atoms``: the out-of-distribution set of ``scripts/bench_starts.py --system
    tio2``."""
    test_frames, config, _ = _test_frames()
    groups, _ = _groups(test_frames, config, _subset_frames())
    return [test_frames[i] for name in OUTSIDE for i in groups[name]]


def _mean_atom_std(pred, signal: str) -> float:
    return float(np.mean(pred.mean_atom_force_std(signal)))


def _summary(pred) -> dict:
    """The figures of one group: accuracy, force uncertainty before and after recalibration (``pred`` carries
    the recalibration; its raw stds are the file's)."""
    from mlip_uq.evaluate import metrics_and_plots

    raw, after = metrics_and_plots(pred.with_calibration({})), metrics_and_plots(pred)
    keep = ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse")
    return {"structures": int(len(pred.n_atoms)), **{k: raw[k] for k in keep},
            "before": {k: raw[k] for k in ("forces_nll", "forces_miscal_area", "forces_sharpness", "energy_nll")},
            "after": {k: after[k] for k in ("forces_nll", "forces_miscal_area", "forces_sharpness", "energy_nll")},
            "mean_atom_force_std": _mean_atom_std(pred.with_calibration({}), "total"),
            "mean_atom_force_std_epistemic": _mean_atom_std(pred.with_calibration({}), "epistemic")}


def measure(runs: Path) -> dict:
    import torch
    from nequip.utils.global_state import set_global_state

    from mlip_uq.compare import load_compare_config, method_of, ood_scores, run_config
    from mlip_uq.data import atoms_to_graph
    from mlip_uq.evaluate import predict_graphs
    from mlip_uq.posterior import load_posterior

    set_global_state()
    test_frames, config, test_indices = _test_frames()
    study = load_compare_config(COMPARE, "cpu")
    groups, counts = _groups(test_frames, config, _subset_frames())
    models, graphs = {}, {}
    for method in METHODS:
        run_dir = runs / REGIME / SPLIT / method
        row_path = run_dir / "compare.json"
        if not row_path.is_file():
            print(f"{method}: no finished run in {run_dir}, left out")
            continue
        row = json.loads(row_path.read_text())
        posterior = load_posterior(method_of(run_config(study, REGIME, SPLIT, method)).artifacts(run_dir).posterior)
        key = (posterior.config.r_max, posterior.config.dtype, tuple(posterior.config.type_names))
        if key not in graphs:
            dtype = getattr(torch, posterior.config.dtype)
            graphs[key] = [atoms_to_graph(a, posterior.config.type_names, posterior.config.r_max, dtype=dtype)
                           for a in test_frames]
        preds = {name: predict_graphs(posterior, [graphs[key][i] for i in idx], batch_size=8)
                 .with_calibration(row["calibration"]) for name, idx in groups.items()}
        models[method] = {
            "samples": posterior.n_samples,
            "subset_test": {"structures": row["n_test"], **{k: row["before"][k] for k in
                                                             ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse")},
                            "forces_nll_before": row["before"]["forces_nll"],
                            "forces_nll_after": row["after"]["forces_nll"]},
            **{name: _summary(pred) for name, pred in preds.items()},
            "ood": {name: ood_scores(preds["inside"].with_calibration({}), preds[name].with_calibration({}))
                    for name in OUTSIDE}}
        x = models[method]
        print(f"{method}: E MAE " + " / ".join(f"{1000 * x[n]['energy_mae']:.1f}" for n in groups)
              + " meV/atom, F MAE " + " / ".join(f"{1000 * x[n]['forces_mae']:.0f}" for n in groups)
              + f" meV/Å ({' / '.join(groups)}), OOD AUROC "
              + " / ".join(f"{x['ood'][n]['ood_auroc']:.2f}" for n in OUTSIDE), flush=True)
    return stamped({"command": "python scripts/tio2_fullset.py", "runs": str(runs), "compare_config": COMPARE.name,
                    "full_test_indices": [int(i) for i in test_indices], "groups": counts, "models": models})


LABELS = {"map": "MAP", "ensemble": "deep ensemble (5)", "sgmcmc_1chain": "SG-MCMC, 1 chain (20 draws)",
          "vi": "mean-field VI (20 draws)"}


def report(record: dict, path: Path = OUT) -> str:
    """The section of docs/tio2_results.md, from the record alone."""
    g = record["groups"]
    low, high = g["subset_range"]["energy_per_atom_eV"]
    e_range, f_max = g["energy_per_atom_eV"], g["max_force_component_eV_per_A"]
    lines = [
        f"The full-data study's test split (`configs/tio2_compare.yaml` without a budget: its filter, then its "
        f"random split with seed 0) holds {g['test_structures']:,} of the full set's structures; "
        f"{g['subset_copies_left_out']} of them are also in the bundled subset and are left out. Of the other "
        f"{g['inside'] + g['outside_force'] + g['outside_energy']:,}, {g['inside']:,} lie inside the subset's range "
        f"(referenced energy {low:.2f} to {high:.2f} eV/atom, force components up to "
        f"{g['subset_range']['max_force_component_eV_per_A']:.1f} eV/Å), {g['outside_force']:,} are outside it in "
        f"force only (force components up to {f_max['outside_force']:.1f} eV/Å) and {g['outside_energy']:,} in "
        f"energy (up to {e_range['outside_energy'][1]:.2f} eV/atom, force components up to "
        f"{f_max['outside_energy']:.1f} eV/Å). The models are those of the random-split tables above, trained "
        "again by the command in [tio2_fullset.py](../scripts/tio2_fullset.py) (run folders are not committed); "
        "each model's errors on the subset's own test split stand beside, so the same models are seen on both "
        "test sets. Energies per atom (meV/atom), forces per component (meV/Å); the force NLL before → after the "
        "isotonic map fitted on the subset's validation split.",
        "",
        "| model | test set | structures | E MAE | E RMSE | F MAE | F RMSE | F NLL before → after recal. | "
        "mean atom force std, total / epistemic (meV/Å) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, m in record["models"].items():
        s = m["subset_test"]
        lines.append(f"| {LABELS[method]} | subset's test split (a) | {s['structures']} | {1000 * s['energy_mae']:.1f} "
                     f"| {1000 * s['energy_rmse']:.1f} | {1000 * s['forces_mae']:.0f} | {1000 * s['forces_rmse']:.0f} "
                     f"| {s['forces_nll_before']:.3f} → {s['forces_nll_after']:.3f} | – |")
        for name, words in GROUP_WORDS.items():
            x = m[name]
            lines.append(
                f"| {LABELS[method]} | full set's, {words} | {x['structures']:,} | {1000 * x['energy_mae']:.1f} | "
                f"{1000 * x['energy_rmse']:.1f} | {1000 * x['forces_mae']:.0f} | {1000 * x['forces_rmse']:.0f} | "
                f"{x['before']['forces_nll']:.3f} → {x['after']['forces_nll']:.3f} | "
                f"{1000 * x['mean_atom_force_std']:.0f} / {1000 * x['mean_atom_force_std_epistemic']:.0f} |")
    lines += [
        "",
        "(a) From the run's `compare.json` (the study's own evaluation; it keeps no stds). The errors and the NLL "
        "before recalibration equal those of the random-split tables above (VI: its converged run); the NLL after "
        "recalibration differs from theirs, as this run's isotonic map is fitted the way the study fits it since "
        "2026-12-04 (the protocol above).",
        "",
        "Telling each outside group from the inside one by the per-structure per-atom force std (AUROC of the raw "
        "stds; *epistemic*: the spread of the samples alone, 0.5 for one model), and the growth of the mean "
        "epistemic per-atom force std (outside / inside):",
        "",
        "| model | outside group | AUROC max std | AUROC mean std | AUROC max epistemic | AUROC mean epistemic | "
        "epistemic growth |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in record["models"].items():
        for name in OUTSIDE:
            o = m["ood"][name]
            growth = "–" if not np.isfinite(o["epistemic_ratio"]) else f"{o['epistemic_ratio']:.2f}x"
            lines.append(f"| {LABELS[method]} | {GROUP_WORDS[name]} | {o['ood_auroc']:.2f} | "
                         f"{o['ood_auroc_mean']:.2f} | {o['ood_auroc_epistemic']:.2f} | "
                         f"{o['ood_auroc_epistemic_mean']:.2f} | {growth} |")
    link = f"[tio2/{path.name}](tio2/{path.name})"
    written = stored_reading(record)
    lines += ["", f"Code version: {record['code_version']}. Numbers: {link} ({record['date']}).", "",
              written if written is not None else
              f"**Reading:** not yet written for this run. Write it under `\"{READING}\"` in {link} and run "
              "`python scripts/tio2_fullset.py --report`."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "tio2_compare_cpu",
                        help="the --out folder of the compare command above")
    parser.add_argument("--report", action="store_true", help="write the section from docs/tio2/fullset.json only")
    args = parser.parse_args()
    if args.report:
        record = json.loads(OUT.read_text())
    else:
        from mlip_uq.files import write_json

        record = measure(args.runs)
        write_json(record, OUT)
    update_section(PAGE, HEADING, report(record))
    print(f"{OUT}\n{PAGE}: {HEADING}")


if __name__ == "__main__":
    main()
