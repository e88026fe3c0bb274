"""``mlip-uq`` command line: thin wrappers over importable functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional


def _train(args) -> int:
    from .train import train

    out = train(args.config, out_dir=args.out, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"posterior: {out / 'posterior.h5'}")
    print(f"metrics:   {out / 'metrics.json'}  ({metrics['evaluated_on']} set: "
          f"energy MAE {1000 * metrics['energy_mae']:.2f} meV/atom, forces MAE {1000 * metrics['forces_mae']:.1f} meV/Å)")
    print(f"parity:    {out / 'parity.png'}")
    return 0


def _evaluate(args) -> int:
    from .data import LabelKeys
    from .evaluate import evaluate_file

    keys = LabelKeys(energy=args.energy_key, forces=args.forces_key, stress=args.stress_key)
    metrics = evaluate_file(args.posterior, args.data, out=args.out, plots_dir=args.plots, keys=keys,
                            batch_size=args.batch_size, device=args.device, indices=_split(args))
    print(metrics_table(metrics))
    if args.out:
        print(f"metrics: {args.out}")
    return 0


_TABLE_METRICS = ("energy_mae", "energy_nll", "energy_miscal_area", "energy_spearman", "energy_sharpness",
                  "forces_mae", "forces_nll", "forces_miscal_area", "forces_spearman", "forces_sharpness")


def metrics_table(metrics: dict) -> str:
    """The main test metrics of :func:`~mlip_uq.evaluate.evaluate_file` as a text table: raw (uncalibrated)
    values, and beside them the recalibrated ones where the posterior has a recalibration."""
    raw = metrics.get("uncalibrated", metrics)
    where = raw.get("evaluated_on", "evaluation")
    lines = [f"{where}: {metrics['n_structures']} structures, K = {metrics['n_samples']}", f"  {'metric':20s} {'raw':>10s}" + (f" {'recalibrated':>13s}" if raw is not metrics else "")]
    for name in _TABLE_METRICS:
        if name in raw:
            line = f"  {name:20s} {raw[name]:10.4f}"
            if raw is not metrics:
                line += f" {metrics[name]:13.4f}"
            lines.append(line)
    if raw is not metrics:
        lines.append(f"  recalibration: {metrics['calibration']}")
    return "\n".join(lines)


def _split(args) -> Optional[List[int]]:
    """The frame indices named by ``--split SPLITS.json --split-name NAME``, or None."""
    if not args.split:
        return None
    path = Path(args.split)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        splits = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"split file {path} is not valid JSON (a run's splits.json is expected): {e}") from e
    if not isinstance(splits, dict):
        raise ValueError(f"split file {path} must map split names to frame indices, got {type(splits).__name__}")
    if args.split_name not in splits:
        raise ValueError(f"{args.split} has no split {args.split_name!r}; it has {sorted(splits)}")
    return splits[args.split_name]


def _calibrate(args) -> int:
    from .data import LabelKeys
    from .evaluate import calibrate_file

    keys = LabelKeys(energy=args.energy_key, forces=args.forces_key, stress=args.stress_key)
    report = calibrate_file(args.posterior, args.data, isotonic=args.isotonic, indices=_split(args), out=args.out,
                            plots_dir=args.plots, keys=keys, batch_size=args.batch_size, device=args.device)
    print(f"calibration written into {args.posterior}: {report['calibration']}")
    for name in ("energy_nll", "energy_miscal_area", "forces_nll", "forces_miscal_area"):
        if name in report["before"]:
            print(f"  {name:20s} before {report['before'][name]:10.4f}   after {report['after'][name]:10.4f}")
    return 0


def _md(args) -> int:
    import ase.io

    from .calculator import UQCalculator
    from .md import ForceStdRule, run_md

    try:
        atoms = ase.io.read(args.structure, args.index)
    except (IndexError, StopIteration):  # ASE's readers raise either for a frame past the end
        n_frames = len(ase.io.read(args.structure, ":"))
        raise ValueError(f"--index {args.index}: {args.structure} has {n_frames} frame(s) "
                         f"(valid indices {-n_frames} to {n_frames - 1})") from None
    if isinstance(atoms, list):
        raise ValueError(f"--index {args.index} names {len(atoms)} frames of {args.structure}; MD needs one")
    rule = None
    if args.max_force_std is not None:
        rule = ForceStdRule(args.max_force_std, relative=args.relative, consecutive=args.consecutive,
                            signal=args.signal)
    calc = UQCalculator(args.posterior, device=args.device, dtype=args.dtype)
    result = run_md(atoms, calc, steps=args.steps, timestep_fs=args.timestep, temperature_K=args.temperature,
                    ensemble=args.ensemble, out_dir=args.out, stop_rule=rule, log_every=args.log_every,
                    friction=args.friction, seed=args.seed, pressure_GPa=args.pressure, uq_every=args.uq_every)
    print(f"{result.steps_done} steps" + (f"; stopped: {result.stop_reason}" if result.stopped else ""))
    print(f"trajectory: {result.trajectory_path}\nlog:        {result.log_path}\nplot:       {result.plot_path}")
    return 0


def _active(args) -> int:
    from .active import run_active

    out = run_active(args.config, out_dir=args.out, overrides=args.overrides, resume=args.resume)
    summary = json.loads((out / "summary.json").read_text())
    calls, last = summary["calls"], (summary["history"] or [{}])[-1]
    print(f"stopped:   {summary['stop_reason']}")
    print(f"calls:     {calls['initial']} initial + {calls['explore']} during exploration ({calls['test']} for the test set)")
    if "forces_mae" in last:
        print(f"test:      forces MAE {1000 * last['forces_mae']:.1f} meV/Å after {summary['updates']} fits")
    print(f"overhead:  {summary['overhead_s']:.1f} s of {summary['timings_s']['total']:.1f} s besides reference calls "
          f"and updates ({summary['bookkeeping_s']:.1f} s bookkeeping)")
    print(f"posterior: {out / summary['posterior']}")
    print(f"log:       {out / 'decisions.jsonl'} (every decision), {out / 'summary.json'}")
    return 0


def _compare(args) -> int:
    from .compare import compare

    out = args.out or f"runs/{Path(args.config).stem}" + (f"_{args.budget}" if args.budget else "")
    compare(args.config, out, budget=args.budget, regimes=args.regimes, splits=args.splits,
            methods=args.methods)
    print(f"results: {Path(out) / 'results.md'} (tables), {Path(out) / 'results.json'}; plots: {out}/*.png")
    return 0


def _data(args) -> int:
    """``mlip-uq data list`` / ``mlip-uq data fetch NAME [--cache DIR] [--force] [--from DIR]``."""
    from . import datasets

    cache = Path(args.cache) if args.cache else None
    if args.data_command == "list":
        print(datasets.list_lines(cache))
        return 0
    for name in args.names:
        folder = datasets.fetch(name, cache=cache, force=args.force, source=args.source, log=print)
        spec = datasets.get(name)
        print(f"{name}: {folder}")
        for file in spec.files:
            print(f"  {folder / file}   (configurations: dataset:{name}/{file})")
    return 0


def _add_data_parser(sub) -> None:
    """The ``data`` command: public data sets by name (:mod:`mlip_uq.datasets`)."""
    p = sub.add_parser("data", help="public data sets by name: download, verify, convert to extended XYZ, cache")
    data = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data.add_parser("list", help="the registered data sets and whether the cache holds them")
    q.add_argument("--cache", help="cache folder (default $MLIP_UQ_DATA, else ~/.cache/mlip_uq)")
    q = data.add_parser("fetch", help="download NAME from its original source, verify it, convert it into the cache")
    q.add_argument("names", nargs="+", metavar="NAME", help="data set(s) of `mlip-uq data list`")
    q.add_argument("--cache", help="cache folder (default $MLIP_UQ_DATA, else ~/.cache/mlip_uq)")
    q.add_argument("--force", action="store_true", help="fetch again though the cache holds it")
    q.add_argument("--from", dest="source", type=Path, help="copy the converted files from this folder (a copy "
                   "made elsewhere) instead of downloading; verified the same way")
    p.set_defaults(func=_data)


def _lammps(args) -> int:
    # mlip-uq lammps (issue 37): a LAMMPS input with the posterior as its potential (mlip_uq.lammps)
    from .lammps import run_lammps
    from .md import ForceStdRule

    rule = None
    if args.max_force_std is not None:
        rule = ForceStdRule(args.max_force_std, relative=args.relative, consecutive=args.consecutive,
                            signal=args.signal)
    try:
        result = run_lammps(args.input, args.posterior, uq_every=args.uq_every, stop_rule=rule, types=args.types, device=args.device, dtype=args.dtype,
                            log_file=args.log, screen=args.screen, variables=dict(args.var or []))
    except (ImportError, RuntimeError) as e:
        print(f"mlip-uq lammps: error: {e}", file=sys.stderr)
        return 2
    print(f"{result.steps_done} steps, {len(result.checks)} uncertainty checks, {result.evaluations} model "
          f"evaluations in {result.wall_seconds:.1f} s" + (f"; stopped: {result.stop_reason}" if result.stopped else ""))
    if result.checks:
        step, total, epistemic = result.checks[-1]
        print(f"last check (step {step}): max atom_force_std {total:.4g} eV/Å, epistemic {epistemic:.4g} eV/Å")
    return 0


def _export(args) -> int:
    # mlip-uq export (issue 37): every sample (and the exact mean model) as nequip packages (mlip_uq.export)
    from .export import export_posterior

    structure = None
    if args.structure:
        import ase.io

        structure = ase.io.read(args.structure, 0)
    manifest = export_posterior(args.posterior, args.out, mean=args.mean, dtype=args.dtype, structure=structure,
                                verify=not args.no_verify)
    out = Path(args.out)
    checked = " (each loaded back by nequip and checked)" if not args.no_verify else ""
    print(f"{manifest['n_samples']} sample(s) as nequip packages in {out}{checked}: "
          f"{manifest['samples'][0]['file']} ... {manifest['samples'][-1]['file']}")
    mean = manifest["mean_model"]
    print(f"mean model: {out / mean['file']} (exact: {mean['why']})" if mean["file"] else
          f"mean model: not written ({'exact, but --mean none' if mean['exact'] else mean['why']})")
    print(f"manifest:   {out / 'manifest.json'}")
    return 0


def _screen(args) -> int:
    # mlip-uq screen (issue 37): per-frame max per-atom force std of a trajectory (mlip_uq.screen)
    from .screen import screen_trajectory

    rows = screen_trajectory(args.posterior, args.trajectory, out=args.out, format=args.format, index=args.index,
                             types=args.types, device=args.device, dtype=args.dtype)
    worst = max(rows, key=lambda r: r["max_atom_force_std"])
    print(f"{len(rows)} frames; largest max atom_force_std {worst['max_atom_force_std']:.4g} eV/Å at frame "
          f"{worst['frame']} (step {worst['step']})")
    if args.threshold is not None:
        above = [r["frame"] for r in rows if r["max_atom_force_std"] > args.threshold]
        print(f"{len(above)} frame(s) above {args.threshold:g} eV/Å" + (f": {above[:20]}" if above else ""))
    if args.out:
        print(f"per-frame table: {args.out}")
    return 0


def _add_prediction_options(p: argparse.ArgumentParser) -> None:
    """Label keys of the data file, batch size and device, shared by the commands that predict labelled data."""
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _add_stop_rule_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """The options of the MD stop rule (:class:`mlip_uq.md.ForceStdRule`), shared by ``md`` and ``lammps``."""
    p.add_argument("--max-force-std", type=float, help=f"{verb} when the largest per-atom force std exceeds this "
                   "(eV/Å; with --relative a fraction of |F_i| + 0.1 eV/Å), tested every --uq-every steps")
    p.add_argument("--relative", action="store_true", help="threshold relative to each atom's force magnitude")
    p.add_argument("--consecutive", type=int, default=1, help="uncertainty checks in a row above the threshold "
                   f"before the {verb}")
    p.add_argument("--signal", choices=["total", "epistemic", "bald"], default="total",
                   help="the per-atom uncertainty --max-force-std reads: total (predictive std, default), "
                   "epistemic (the samples' spread alone) or bald (½ log(1 + σ²_epi/σ²_ale), nats)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlip-uq", description="Uncertainty-aware machine-learned interatomic potentials."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML configuration; writes DIR/posterior.h5")
    p.add_argument("config", help="YAML configuration (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override configuration values, e.g. training.max_epochs=5")
    p.add_argument("--out", help="output folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds (without it, or --resume, such a folder is refused)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="metrics (and plots) of a posterior on labelled structures")
    p.add_argument("posterior", help="posterior.h5")
    p.add_argument("data", help="labelled structures, any ASE-readable file (extxyz first)")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.add_argument("--plots", help="write parity/calibration PNGs into this folder")
    _add_prediction_options(p)
    p.add_argument("--split", help="a training run's splits.json: evaluate only the frames of DATA listed in it "
                   "under --split-name (the run's test split by default)")
    p.add_argument("--split-name", default="test")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("calibrate", help="fit std recalibration on validation structures; writes it into the posterior")
    p.add_argument("posterior", help="posterior.h5 (updated in place, atomically)")
    p.add_argument("data", help="labelled validation structures, any ASE-readable file")
    p.add_argument("--isotonic", action="store_true", help="isotonic maps instead of one scalar factor per quantity")
    p.add_argument("--split", help="a training run's splits.json: use only the frames of DATA listed in it under "
                   "--split-name (the run's validation split by default)")
    p.add_argument("--split-name", default="val")
    p.add_argument("--out", help="write the before/after metrics to this JSON file")
    p.add_argument("--plots", help="write the recalibrated calibration plots into this folder")
    _add_prediction_options(p)
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("md", help="uncertainty-aware MD; writes trajectory.extxyz, md_log.csv, uncertainty.png")
    p.add_argument("posterior", help="posterior.h5")
    p.add_argument("structure", help="starting structure, any ASE-readable file (xyz, extxyz, cif, ...)")
    p.add_argument("--index", default="0", help="frame of the structure file (ASE index, default 0)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--ensemble", default="langevin", choices=["nve", "langevin", "npt"])
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction (1/fs)")
    p.add_argument("--pressure", type=float, default=0.0, help="npt pressure (GPa)")
    _add_stop_rule_arguments(p, "stop")
    p.add_argument("--log-every", type=int, default=1, help="record/log/write a frame every this many steps")
    p.add_argument("--uq-every", type=int, default=1, help="compute the per-atom force std and test "
                   "--max-force-std every this many steps (the per-atom energy std is logged at every step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="md_out", help="output folder (default md_out); an unfinished run leaves the "
                   "files of an earlier run there as they were and its own in *.partial files")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "float64"], help="model precision (default: the posterior's)")
    p.set_defaults(func=_md)

    p = sub.add_parser("active", help="uncertainty-triggered relabelling with a reference calculator (active learning)")
    p.add_argument("config", help="active-learning configuration (e.g. configs/active_ethanol_xtb.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override configuration values, e.g. budget.max_calls=5")
    p.add_argument("--out", help="output folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped (a new budget may be given)")
    p.set_defaults(func=_active)

    p = sub.add_parser("compare", help="one data set, several methods, regimes and splits: one table and plots")
    p.add_argument("config", help="comparison configuration (e.g. configs/tio2_compare.yaml)")
    p.add_argument("--budget", help="a budget of the configuration's compare.budgets, e.g. cpu")
    p.add_argument("--out", help="output folder (default runs/<config name>[_<budget>]); finished runs are reused")
    p.add_argument("--regimes", nargs="+", metavar="REGIME", help="run only these data regimes (the study in parts)")
    p.add_argument("--splits", nargs="+", metavar="SPLIT", help="run only these splits")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="run only these methods (and the map run they start from)")
    p.set_defaults(func=_compare)

    # mlip-uq lammps (issue 37)
    p = sub.add_parser("lammps", help="run a LAMMPS input with the posterior as its potential and per-atom "
                       "uncertainty (fix external; the input has a line 'mlip_uq' where the model goes)")
    p.add_argument("input", help="LAMMPS input (units metal) with one line 'mlip_uq' after the box and atoms exist")
    p.add_argument("posterior", help="posterior.h5")
    p.add_argument("--uq-every", type=int, default=1, help="compute the per-atom force std (d_fstd, d_fstd_epi) and "
                   "test --max-force-std every this many timesteps")
    _add_stop_rule_arguments(p, "halt")
    p.add_argument("--types", nargs="+", metavar="ELEMENT", help="element of each LAMMPS atom type, type 1 first "
                   "(default: the posterior's type names in order)")
    p.add_argument("--log", default="log.lammps", help="LAMMPS log file (default log.lammps)")
    p.add_argument("--screen", action="store_true", help="show LAMMPS's screen output")
    p.add_argument("--var", nargs=2, action="append", metavar=("NAME", "VALUE"), help="an input variable (-var)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "float64"], help="model precision (default: the posterior's)")
    p.set_defaults(func=_lammps)

    # mlip-uq export and screen (issue 37)
    p = sub.add_parser("export", help="every posterior sample (and the exact mean model) as nequip packages "
                       "(.nequip.zip, for nequip's calculator and nequip-compile) plus manifest.json")
    p.add_argument("posterior", help="posterior.h5")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mean", choices=["auto", "require", "none"], default="auto", help="the posterior-mean model: "
                   "where exact (auto, the default), required (an error where not exact), or none")
    p.add_argument("--dtype", choices=["float32", "float64"], help="precision of the exported models (default: the "
                   "posterior's)")
    p.add_argument("--structure", help="example structure kept in each package for nequip-compile (ASE-readable; "
                   "default: a small generated cell)")
    p.add_argument("--no-verify", action="store_true", help="do not load each package back through nequip to check it")
    p.set_defaults(func=_export)

    p = sub.add_parser("screen", help="per-frame max per-atom force std of a trajectory (LAMMPS dump, extxyz, ...)")
    p.add_argument("posterior", help="posterior.h5")
    p.add_argument("trajectory", help="any ASE-readable trajectory; *.lammpstrj / *.dump are read as LAMMPS dumps")
    p.add_argument("--out", help="write the per-frame table to this CSV file")
    p.add_argument("--format", help="ASE format of the trajectory (default: from its name)")
    p.add_argument("--index", default=":", help="ASE index of the frames (default: all)")
    p.add_argument("--types", nargs="+", metavar="ELEMENT", help="element of each LAMMPS atom type of a dump, type 1 "
                   "first (default: the posterior's type names)")
    p.add_argument("--threshold", type=float, help="also list the frames whose max atom_force_std exceeds this (eV/Å)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "float64"], help="model precision (default: the posterior's)")
    p.set_defaults(func=_screen)

    _add_data_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # overrides may follow options (`train CONFIG --out DIR key=value`), which argparse leaves unparsed
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("train", "active") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from nequip.utils.global_state import set_global_state

    set_global_state()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        # bad input (data, configuration, files) is reported by name, without a traceback
        print(f"mlip-uq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
