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
regimes, splits and methods.

Every (regime, split, method) run goes to ``OUT/<regime>/<split>/<method>/`` through
:func:`mlip_uq.train.train`; a finished run (its ``compare.json`` exists) is reused, so a killed study resumes,
and a trained one (``train_seconds.json``) is only evaluated again (delete ``compare.json`` to re-evaluate).
Each run is evaluated on its test set before and after recalibration on its validation set; the training
wall-clock and the inference time per test structure are recorded. The study writes ``results.json``,
``results.md`` (tables) and PNG plots: calibration curves and error-vs-std per split, and per-method bars.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .config import ConfigError, apply_override, merge_sections, read_config_file
from .data import FrameStore
from .evaluate import Predictions, metrics_and_plots, predict_graphs
from .files import write_json
from .files import atomic_write
from .posterior import load_posterior
from .train import train
from .uq.plots import new_figure, save_figure

log = logging.getLogger(__name__)

#: Columns of the result tables: (metric key, header, scale, format).
TABLE = [
    ("energy_mae", "E MAE (meV/atom)", 1000, ".1f"),
    ("forces_mae", "F MAE (meV/Å)", 1000, ".0f"),
    ("forces_nll", "F NLL", 1, ".2f"),
    ("forces_miscal_area", "F miscal.", 1, ".3f"),
    ("forces_spearman", "F Spearman", 1, ".2f"),
    ("energy_nll", "E NLL", 1, ".2f"),
    ("energy_miscal_area", "E miscal.", 1, ".3f"),
]


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
    base = copy.deepcopy(study["base"])
    base_dir = Path(study["base_dir"])
    for key in ("path", "test_path", "store"):
        value = base.get("data", {}).get(key)
        if value and not Path(value).expanduser().is_absolute():
            base["data"][key] = str((base_dir / value).resolve())
    config = merge_sections(base, study["methods"][method])
    config.setdefault("data", {})["split"] = dict(study["splits"][split])
    config["name"] = f"{regime}/{split}/{method}"
    regime_overrides = [f"{k}={v}" for k, v in study["regimes"][regime].items() if k != "only_splits"]
    for override in study["overrides"] + regime_overrides:
        apply_override(config, override)
    return config


def compare(config_path, out_dir, budget: Optional[str] = None) -> Dict:
    """Run the study of ``config_path`` into ``out_dir`` and return its results (also ``results.json``)."""
    study = load_compare_config(config_path, budget)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(r, s, m) for r, regime in study["regimes"].items() for s in study["splits"]
            if s in regime.get("only_splits", study["splits"]) for m in study["methods"]]
    rows: List[Dict] = []
    started = time.perf_counter()
    for i, (regime, split, method) in enumerate(runs, start=1):
        log.info("[%d/%d] %s / %s / %s (%.0f min so far)", i, len(runs), regime, split, method,
                 (time.perf_counter() - started) / 60)
        rows.append(_run(study, regime, split, method, out / regime / split / method))
    results = {"budget": study["budget"], "calibration": study["calibration"], "runs": rows}
    write_json(results, out / "results.json")
    with atomic_write(out / "results.md") as tmp:
        tmp.write_text(results_markdown(rows))
    for regime, split in dict.fromkeys((r, s) for r, s, _ in runs):
        _plot_split(out, regime, split, list(study["methods"]))
    for regime in study["regimes"]:
        _plot_bars([r for r in rows if r["regime"] == regime], out / f"bars_{regime}.png")
    return results


def _run(study: Dict, regime: str, split: str, method: str, run_dir: Path) -> Dict:
    """Train (or reuse) one run and evaluate it on its test set before and after recalibration."""
    summary_path = run_dir / "compare.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    config = run_config(study, regime, split, method)
    config["data"]["store"] = str(run_dir.parents[2] / "data.h5")  # neighbour lists built once for the study
    timing = run_dir / "train_seconds.json"  # written once training finished: evaluation may be redone alone
    if not timing.is_file():
        start = time.perf_counter()
        train(config, out_dir=run_dir, overwrite=True)  # a run killed before it finished is redone
        write_json({"train_seconds": time.perf_counter() - start}, timing)
    train_seconds = json.loads(timing.read_text())["train_seconds"]
    posterior = load_posterior(run_dir / "posterior.h5")
    splits = json.loads((run_dir / "splits.json").read_text())
    store = FrameStore.open(config["data"]["store"])
    dtype = getattr(torch, posterior.config.dtype)
    batch = config.get("evaluate", {}).get("batch_size", 16)
    val = predict_graphs(posterior, store.graphs(splits["val"], dtype=dtype), batch).with_calibration({})
    test_graphs = store.graphs(splits["test"], dtype=dtype)
    start = time.perf_counter()
    test = predict_graphs(posterior, test_graphs, batch).with_calibration({})
    infer_seconds = (time.perf_counter() - start) / max(1, len(test_graphs))
    row = {"regime": regime, "split": split, "method": method, "n_train": len(splits["train"]),
           "n_test": len(splits["test"]), "n_samples": posterior.n_samples, "train_seconds": train_seconds,
           "inference_seconds_per_structure": infer_seconds, "before": metrics_and_plots(test)}
    calibration = val.fitted_calibration(isotonic=study["calibration"] == "isotonic")
    recalibrated = test.with_calibration(calibration)
    row["after"] = metrics_and_plots(recalibrated)
    row["calibration"] = _jsonable(calibration)
    _save_errors(run_dir / "test_errors.npz", recalibrated, test)
    write_json(row, summary_path)
    return row


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
                  "", "| method | K | " + " | ".join(h for _, h, _, _ in TABLE) + " | train (min) | infer (ms/struct) |",
                  "|---" * (len(TABLE) + 4) + "|"]
        for r in group:
            cells = []
            for key, _, scale, fmt in TABLE:
                before = r["before"].get(key)
                after = r["after"].get(key)
                text = "–" if before is None or not np.isfinite(before) else format(scale * before, fmt)
                if after is not None and key not in ("energy_mae", "forces_mae", "forces_spearman") and np.isfinite(after):
                    text += f" → {format(scale * after, fmt)}"
                cells.append(text)
            lines.append(f"| {r['method']} | {r['n_samples']} | " + " | ".join(cells)
                         + f" | {r['train_seconds'] / 60:.1f} | {1000 * r['inference_seconds_per_structure']:.1f} |")
        lines.append("")
    lines.append("Uncertainty metrics: before → after recalibration on the validation set (one factor per quantity "
                 "or isotonic, as the study states). A MAP model's stds are its learned observation noise.")
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
