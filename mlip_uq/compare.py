"""``mlip-uq compare``: one data set, several methods, data regimes and splits — one table and plots.

A comparison configuration is a training configuration (``data``, ``model``, ``evaluate``, ...: what every
method shares) plus a ``compare`` section::

    compare:
      regimes: {full: {}, small: {data.n_train: 700}}          # name -> overrides (only_splits: [...])
      splits:  {random: {kind: random, ...}, ...}              # name -> data.split
      methods: {map: {method: map, training: {...}}, ...}      # name -> sections merged into the base
      calibration: scalar                                      # or isotonic: fitted on each run's val set
      budgets: {cpu: {overrides: [...], regimes: {...}, splits: [...], methods: [...]}}

A budget applies its ``overrides`` to every run and may select (a list of names) or replace (a mapping) the
regimes, splits and methods; ``--regimes`` / ``--splits`` / ``--methods`` run a part of the study.

A method that would train a MAP model of its own which the study's ``map`` run of the same regime and split
can stand in for says so (its ``map_start``, :class:`~mlip_uq.inference.MapStart`: SG-MCMC and VI with ``init`` or
``prior.center`` ``map`` take the MAP run's posterior file for those options; a deep ensemble whose members train
as the ``map`` run does takes its model as member 0); the MAP run is then trained first (one MAP fit per split)
and the cost column counts it in (``map_seconds``). What a run folder holds (its posterior file, its validation
curves) is asked of its method (``artifacts``): this module knows no method's folder layout.

Every (regime, split, method) run goes to ``OUT/<regime>/<split>/<method>/`` through
:func:`mlip_uq.train.train`; a finished run (its ``compare.json`` exists) is reused, so a killed study resumes,
and a trained one (``train_seconds.json``) is only evaluated again (delete ``compare.json`` to re-evaluate; a
row of another :data:`ROW_VERSION` is evaluated again).
Each run is evaluated on its test set before and after recalibration on its validation set; the training
wall-clock, the inference time per test structure and the plateau of every validation-loss curve of the run
(:func:`plateau`: MAP, ensemble members, MAP phases) are recorded. The study writes ``results.json``,
``results.md`` (tables) and PNG plots: calibration curves and error-vs-std per split, and per-method bars.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import yaml

from .config import (
    BASE_DEFAULTS,
    ConfigError,
    apply_override,
    dump_config,
    load_config,
    merge_sections,
    read_config_file,
)
from .data import FrameStore
from .datasets import is_dataset_path
from .evaluate import Predictions, metrics_and_plots, predict_graphs
from .files import atomic_write, write_json
from .inference import Artifacts, MapStart, MethodModule, load_method
from .inference.trainer import MAPSettings
from .posterior import load_posterior
from .train import train
from .uq.metrics import auroc
from .uq.plots import new_figure, save_figure

log = logging.getLogger(__name__)

#: Columns of the result tables: (metric key, header, scale, format).
TABLE = [
    ("energy_mae", "E MAE (meV/atom)", 1000, ".1f"),
    ("energy_rmse", "E RMSE (meV/atom)", 1000, ".1f"),
    ("forces_mae", "F MAE (meV/Å)", 1000, ".0f"),
    ("forces_rmse", "F RMSE (meV/Å)", 1000, ".0f"),
    ("forces_nll", "F NLL", 1, ".2f"),
    ("forces_miscal_area", "F miscal.", 1, ".3f"),
    ("forces_spearman", "F Spearman", 1, ".2f"),
    ("energy_nll", "E NLL", 1, ".2f"),
    ("energy_miscal_area", "E miscal.", 1, ".3f"),
    ("energy_rms_cal", "E RMSCE", 1, ".3f"),
    ("energy_spearman", "E Spearman", 1, ".2f"),
]

#: Columns that recalibration does not change (accuracy and rank metrics): shown once.
RAW_ONLY = ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "forces_spearman", "energy_spearman")


def load_compare_config(path, budget: Optional[str] = None) -> Dict:
    """The comparison configuration at ``path``: ``{"base": training config, "base_dir", "regimes", "splits",
    "methods", "calibration", "budget"}``, with the named ``budget`` (e.g. ``cpu``) applied."""
    raw, base_dir = read_config_file(path)
    if "compare" not in raw:
        raise ConfigError(f"{path} has no 'compare' section (regimes, splits, methods)")
    spec = raw.pop("compare")
    unknown = set(spec) - {"regimes", "splits", "methods", "calibration", "budgets"}
    if unknown:
        raise ConfigError(f"unknown compare option(s) {sorted(unknown)}; known: regimes, splits, methods, calibration, budgets")
    for key in ("splits", "methods"):
        if not isinstance(spec.get(key), dict) or not spec[key]:
            raise ConfigError(f"compare.{key} must map names to settings")
    regimes = spec.get("regimes") or {"full": {}}
    calibration = spec.get("calibration", "scalar")
    if calibration not in ("scalar", "isotonic"):
        raise ConfigError(f"compare.calibration must be scalar or isotonic, got {calibration!r}")
    # relative data paths of the base are resolved against the configuration's folder (run_config)
    study = {"base": raw, "base_dir": str(base_dir), "regimes": regimes, "splits": spec["splits"],
             "methods": spec["methods"],
             "calibration": calibration, "budget": None, "overrides": []}
    if budget is not None:
        budgets = spec.get("budgets", {})
        if budget not in budgets:
            raise ConfigError(f"budget {budget!r} is not in compare.budgets; available: {sorted(budgets)}")
        chosen = budgets[budget]
        for key in ("regimes", "splits", "methods"):
            if isinstance(chosen.get(key), dict):  # replaced (e.g. smaller regimes)
                study[key] = chosen[key]
            elif key in chosen:  # a selection of names
                missing = set(chosen[key]) - set(study[key])
                if missing:
                    raise ConfigError(f"budget {budget!r} names unknown {key} {sorted(missing)}")
                study[key] = {name: study[key][name] for name in chosen[key]}
        study["overrides"] = list(chosen.get("overrides", []))
        study["budget"] = {"name": budget, **chosen}
    return study


def run_config(study: Dict, regime: str, split: str, method: str) -> Dict:
    """The training configuration of one run of ``study`` (a dict for :func:`mlip_uq.train.train`)."""
    config = copy.deepcopy(merge_sections(study["base"], study["methods"][method]))
    config.setdefault("data", {})["split"] = dict(study["splits"][split])
    config["name"] = f"{regime}/{split}/{method}"
    regime_overrides = [f"{k}={v}" for k, v in study["regimes"][regime].items() if k != "only_splits"]
    for override in study["overrides"] + regime_overrides:
        apply_override(config, override)
    # relative data paths (of the base or of an override) are relative to the configuration's folder; a
    # ``dataset:`` name is resolved by the training's load_config
    for key in ("path", "test_path", "store"):
        value = config["data"].get(key)
        if value and not is_dataset_path(value) and not Path(value).expanduser().is_absolute():
            config["data"][key] = str((Path(study["base_dir"]) / value).resolve())
    return config


def compare(config_path, out_dir, budget: Optional[str] = None, regimes: Optional[List[str]] = None,
            splits: Optional[List[str]] = None, methods: Optional[List[str]] = None) -> Dict:
    """Run the study of ``config_path`` into ``out_dir`` (only the ``regimes`` / ``splits`` / ``methods`` of it,
    when given) and return the results of every finished run of the study in ``out_dir`` (also
    ``results.json``)."""
    study = load_compare_config(config_path, budget)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    every = [(r, s, m) for r, regime in study["regimes"].items() for s in study["splits"]
             if s in regime.get("only_splits", study["splits"]) for m in study["methods"]]
    selection = (regimes, splits, methods)
    for key, names in zip(("regimes", "splits", "methods"), selection):
        unknown = set(names or ()) - set(study[key])
        if unknown:
            raise ConfigError(f"--{key} {sorted(unknown)} not in the study; it has {sorted(study[key])}")
    runs = [run for run in every if all(names is None or name in names for name, names in zip(run, selection))]
    # split by split, the study's MAP run first where another method starts from it
    pairs = list(dict.fromkeys(run[:2] for run in every))
    runs = set(runs) | {(r, s, MAP) for r, s, m in runs if map_start(study, r, s, m)}
    runs = sorted(runs, key=lambda run: (pairs.index(run[:2]), run[2] != MAP, every.index(run)))
    started = time.perf_counter()
    for i, (regime, split, method) in enumerate(runs, start=1):
        log.info("[%d/%d] %s / %s / %s (%.0f min so far)", i, len(runs), regime, split, method,
                 (time.perf_counter() - started) / 60)
        _run(study, regime, split, method, out / regime / split / method)
    rows = [json.loads(p.read_text()) for r, s, m in every if (p := out / r / s / m / "compare.json").is_file()]
    results = {"budget": study["budget"], "calibration": study["calibration"], "runs": rows}
    write_json(results, out / "results.json")
    with atomic_write(out / "results.md") as tmp:
        tmp.write_text(results_markdown(rows))
    for regime, split in dict.fromkeys((r["regime"], r["split"]) for r in rows):
        _plot_split(out, regime, split, list(study["methods"]))
    for regime in dict.fromkeys(r["regime"] for r in rows):
        _plot_bars([r for r in rows if r["regime"] == regime], out / f"bars_{regime}.png")
    return results


#: The method name whose run the other methods of a split start from (:func:`map_start`).
MAP = "map"
#: The version of the rows in ``compare.json``: a row of another version (or none: written before versions, e.g.
#: without the epistemic OOD scores) is evaluated again from its trained run.
ROW_VERSION = 2


def method_of(config: Dict[str, Any]) -> MethodModule:
    """The method module (:class:`~mlip_uq.inference.MethodModule`) of a run configuration."""
    return load_method(config.get("method", BASE_DEFAULTS["method"]))


def map_start(study: Dict, regime: str, split: str, method: str) -> Optional[MapStart]:
    """How run ``method`` of (``regime``, ``split``) starts from the study's ``map`` run of the same regime and
    split, as its method says (``map_start`` of :class:`~mlip_uq.inference.MethodModule`); None: it does not (or
    it is that run, or the study has none)."""
    if method == MAP or MAP not in study["methods"]:
        return None
    config = run_config(study, regime, split, method)
    return method_of(config).map_start(config, run_config(study, regime, split, MAP))


def _set_option(config: Dict, dotted: str, value: Any) -> None:
    """Set the dotted key ``dotted`` (``sgmcmc.prior.center``) of ``config`` in place."""
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _run(study: Dict, regime: str, split: str, method: str, run_dir: Path) -> Dict:
    """Train (or reuse) one run and evaluate it on its test set before and after recalibration."""
    summary_path = run_dir / "compare.json"
    if summary_path.is_file():
        row = json.loads(summary_path.read_text())
        if row.get("row_version") == ROW_VERSION:  # else evaluated again, the training reused
            return row
    config = run_config(study, regime, split, method)
    config["data"]["store"] = str(run_dir.parents[2] / "data.h5")  # neighbour lists built once for the study
    map_seconds = 0.0
    from_map = map_start(study, regime, split, method)
    if from_map is not None:
        map_dir = run_dir.parent / MAP
        map_run: Artifacts = method_of(run_config(study, regime, split, MAP)).artifacts(map_dir)
        for key in from_map.options:
            _set_option(config, key, str(map_run.posterior))
        map_seconds = json.loads((map_dir / "train_seconds.json").read_text())["train_seconds"]
    timing = run_dir / "train_seconds.json"  # written once training finished: evaluation may be redone alone
    if not timing.is_file():
        began = time.perf_counter()
        if from_map is not None and from_map.plant is not None:  # the MAP run planted as a finished part
            shutil.rmtree(run_dir, ignore_errors=True)  # a run killed before it finished is redone
            from_map.plant(map_run, run_dir)
            dump_config(load_config(config), run_dir / "config.yaml")
            train(config, out_dir=run_dir, resume=True)
        else:
            train(config, out_dir=run_dir, overwrite=True)  # a run killed before it finished is redone
        write_json({"train_seconds": time.perf_counter() - began}, timing)
    train_seconds = json.loads(timing.read_text())["train_seconds"]
    posterior = load_posterior(method_of(config).artifacts(run_dir).posterior)
    splits = json.loads((run_dir / "splits.json").read_text())
    store = FrameStore.open(config["data"]["store"])
    dtype = getattr(torch, posterior.config.dtype)
    batch = config.get("evaluate", {}).get("batch_size", 16)
    val = predict_graphs(posterior, store.graphs(splits["val"], dtype=dtype), batch).with_calibration({})
    test_graphs = store.graphs(splits["test"], dtype=dtype)
    start = time.perf_counter()
    test = predict_graphs(posterior, test_graphs, batch).with_calibration({})
    infer_seconds = (time.perf_counter() - start) / max(1, len(test_graphs))
    row = {"row_version": ROW_VERSION, "regime": regime, "split": split, "method": method,
           "n_train": len(splits["train"]),
           "n_test": len(splits["test"]), "n_samples": posterior.n_samples, "train_seconds": train_seconds,
           "map_seconds": map_seconds, "inference_seconds_per_structure": infer_seconds, "plateau": plateaus(run_dir),
           "before": metrics_and_plots(test)}
    calibration = val.fitted_calibration(isotonic=study["calibration"] == "isotonic")
    recalibrated = test.with_calibration(calibration)
    row["after"] = metrics_and_plots(recalibrated)
    # out-of-distribution detection: the test structures against the validation ones (drawn with the training
    # data), scored by the raw per-structure max atom force std (~0.5 on a random split), and by the mean one,
    # which does not favour the larger cells (the cell-size split tests on cells 2-4x the training ones) but
    # follows the composition where the noise is per element; each by the predictive std (ood_auroc,
    # ood_auroc_mean) and by its epistemic part alone (ood_auroc_epistemic, ood_auroc_epistemic_mean: the OOD
    # question, mlip_uq.uq.signals; 0.5 for one model)
    row.update(ood_scores(val, test))
    row["calibration"] = _jsonable(calibration)
    _save_errors(run_dir / "test_errors.npz", recalibrated, test)
    write_json(row, summary_path)
    return row


def ood_scores(in_distribution: Predictions, ood: Predictions) -> Dict[str, float]:
    """AUROC of telling the structures of ``ood`` from those of ``in_distribution`` by the per-structure max
    and mean per-atom force uncertainty, predictive (``ood_auroc``, ``ood_auroc_mean``) and epistemic
    (``ood_auroc_epistemic``, ``ood_auroc_epistemic_mean``); and the ratio of the mean epistemic per-atom force
    std out of / in distribution (``epistemic_ratio``; nan for one model)."""
    labels = np.concatenate([np.zeros(len(in_distribution.n_atoms)), np.ones(len(ood.n_atoms))])
    scores = {}
    for signal, suffix in (("total", ""), ("epistemic", "_epistemic")):
        for kind, score in (("", Predictions.max_atom_force_std), ("_mean", Predictions.mean_atom_force_std)):
            values = np.concatenate([score(in_distribution, signal), score(ood, signal)])
            scores[f"ood_auroc{suffix}{kind}"] = auroc(values, labels, 0.5)  # ties (one model): 0.5
    inside = float(np.mean(in_distribution.mean_atom_force_std("epistemic")))
    scores["epistemic_ratio"] = float(np.mean(ood.mean_atom_force_std("epistemic"))) / inside if inside > 0 else \
        float("nan")
    return scores


def plateaus(run_dir: Path) -> Dict[str, Dict]:
    """:func:`plateau` of every validation-loss curve of a run (the MAP model's, each ensemble member's, a MAP
    phase's: the ``curves`` of its method's :class:`~mlip_uq.inference.Artifacts`), by the curve's name; the
    stopping rules are the run's ``training`` settings (``config.yaml``)."""
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    settings = MAPSettings.from_dict(config.get("training") or {})
    return {name: plateau(path, settings.min_lr, settings.patience)
            for name, path in method_of(config).artifacts(Path(run_dir)).curves.items()}


def plateau(metrics_csv: Path, min_lr: float, patience: int) -> Dict:
    """How a training run's validation curve ended (``metrics.csv`` of :func:`mlip_uq.inference.trainer.fit_map`).

    Returns:
        ``epochs``, ``best_epoch`` (0-based), ``final_lr``, ``stopped_by`` (``lr_floor``: the plateau schedule
        reached ``min_lr``; ``patience``: no better validation loss for ``patience`` epochs; ``budget``: the
        time or epoch limit, i.e. possibly before a plateau), the validation energy and force MAE at the best
        epoch and ``energy_mae_gain_last_quarter``: how much lower the best validation energy MAE of the last
        quarter of the epochs is than the best before it, relative to the latter (0: no gain at the end).
    """
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{metrics_csv} has no epoch rows")
    loss = np.array([float(r["val_loss"]) for r in rows])
    energy = np.array([float(r["val_energy_mae"]) for r in rows])
    best = int(np.argmin(loss))
    final_lr = float(rows[-1]["lr"])
    if final_lr <= min_lr * (1 + 1e-6):
        stopped_by = "lr_floor"
    elif len(rows) - 1 - best >= patience:
        stopped_by = "patience"
    else:
        stopped_by = "budget"
    head = max(1, (3 * len(rows)) // 4)
    before = energy[:head].min()
    gain = float((before - energy.min()) / before) if head < len(rows) else float("nan")
    return {"epochs": len(rows), "best_epoch": best, "final_lr": final_lr, "stopped_by": stopped_by,
            "val_energy_mae": float(energy[best]), "val_forces_mae": float(rows[best]["val_forces_mae"]),
            "energy_mae_gain_last_quarter": gain}


def _jsonable(value):
    """``value`` with numpy arrays as lists (isotonic calibration knots)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value.tolist() if isinstance(value, np.ndarray) else value


def _save_errors(path: Path, calibrated: Predictions, raw: Predictions) -> None:
    """Test-set force errors and stds (raw and recalibrated), for the study's plots."""
    np.savez_compressed(path, forces_error=(raw.forces_pred - raw.forces_true).ravel(),
                        forces_std=raw.forces_std.ravel(), forces_std_calibrated=calibrated.forces_std.ravel())


def results_markdown(rows: List[Dict]) -> str:
    """One table per (regime, split): a row per method, metrics before → after recalibration, and cost."""
    lines = []
    for regime, split in dict.fromkeys((r["regime"], r["split"]) for r in rows):
        group = [r for r in rows if r["regime"] == regime and r["split"] == split]
        lines += [f"### {regime} data, {split} split (n_train = {group[0]['n_train']}, n_test = {group[0]['n_test']})",
                  "", "| method | K | " + " | ".join(h for _, h, _, _ in TABLE)
                  + " | OOD AUROC epistemic max / mean | OOD AUROC total max / mean | train (min) | infer (ms/struct) |",
                  "|---" * (len(TABLE) + 6) + "|"]
        for r in group:
            cells = []
            for key, _, scale, fmt in TABLE:
                before = r["before"].get(key)
                after = r["after"].get(key)
                text = "–" if before is None or not np.isfinite(before) else format(scale * before, fmt)
                if after is not None and key not in RAW_ONLY and np.isfinite(after):
                    text += f" → {format(scale * after, fmt)}"
                cells.append(text)
            cost = (r["train_seconds"] + r["map_seconds"]) / 60
            ood = (f"{r['ood_auroc_epistemic']:.2f} / {r['ood_auroc_epistemic_mean']:.2f} | "
                   f"{r['ood_auroc']:.2f} / {r['ood_auroc_mean']:.2f}")
            lines.append(f"| {r['method']} | {r['n_samples']} | " + " | ".join(cells) + f" | {ood} | "
                         f"{cost:.1f} | {1000 * r['inference_seconds_per_structure']:.1f} |")
        lines.append("")
    lines.append("Uncertainty metrics: before → after recalibration on the validation set (one factor per quantity "
                 "or isotonic, as the study states). A MAP model's stds are its learned observation noise. "
                 "Training time includes the MAP run a method starts from. OOD AUROC: the raw per-structure max "
                 "(and mean) per-atom force std, its epistemic part (the spread of the samples; 0.5 for one model) "
                 "and the predictive std, telling the test structures from the validation ones (drawn with the "
                 "training data; ~0.5 on a random split).")
    return "\n".join(lines) + "\n"


def _plot_split(out: Path, regime: str, split: str, methods: List[str]) -> None:
    """Calibration curves (recalibrated) and binned error vs std of every method with uncertainties."""
    from .uq.metrics import binned_rmse_rmv, coverage_curve

    data = {}
    for m in methods:
        path = out / regime / split / m / "test_errors.npz"
        if path.is_file():
            data[m] = np.load(path)
    if not data:
        return
    fig = new_figure(11, 4.5)
    ax_cal, ax_err = fig.subplots(1, 2)
    for m, d in data.items():
        expected, observed = coverage_curve(d["forces_error"], d["forces_std_calibrated"])
        ax_cal.plot(expected, observed, label=m)
        rmv, rmse, _ = binned_rmse_rmv(np.abs(d["forces_error"]), d["forces_std_calibrated"])
        ax_err.loglog(rmv, rmse, "o-", ms=3, label=m)
    ax_cal.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax_cal.set(xlabel="expected coverage", ylabel="observed coverage",
               title=f"forces, recalibrated — {regime} data, {split} split")
    ax_cal.legend(fontsize=8)
    lims = ax_err.get_xlim()
    ax_err.plot(lims, lims, "k--", lw=0.8)
    ax_err.set(xlabel="predicted std, binned RMV (eV/Å)", ylabel="RMSE (eV/Å)", title="error vs predicted std")
    save_figure(fig, out / f"calibration_{regime}_{split}.png")


def _plot_bars(rows: List[Dict], path: Path) -> None:
    """Per-method bars of force MAE, NLL and miscalibration area (after recalibration), one group per split."""
    if not rows:
        return
    splits = list(dict.fromkeys(r["split"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = [("forces_mae", "force MAE (eV/Å)"), ("forces_nll", "force NLL"), ("forces_miscal_area", "force miscal. area")]
    fig = new_figure(5 * len(panels), 4)
    width = 0.8 / len(methods)
    for ax, (key, label) in zip(fig.subplots(1, len(panels)), panels):
        for j, m in enumerate(methods):
            values = []
            for s in splits:
                r = next((r for r in rows if r["split"] == s and r["method"] == m), None)
                metrics = r["after"] if r else {}
                values.append(metrics.get(key, np.nan) if metrics else np.nan)
            ax.bar(np.arange(len(splits)) + j * width, values, width, label=m)
        ax.set_xticks(np.arange(len(splits)) + 0.4 - width / 2, splits, fontsize=8)
        ax.set_ylabel(label)
        if key == "forces_nll":
            ax.set_yscale("symlog")
    fig.axes[0].legend(fontsize=7)
    save_figure(fig, path)
