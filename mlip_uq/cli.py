"""``mlip-uq`` command line: thin wrappers over importable functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional


def _train(args) -> int:
    from .train import train

    out = train(args.config, out_dir=args.out, overrides=args.overrides, resume=args.resume)
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
                            batch_size=args.batch_size, device=args.device)
    print(json.dumps(metrics, indent=2))
    return 0


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
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="metrics (and plots) of a posterior on labelled structures")
    p.add_argument("posterior", help="posterior.h5")
    p.add_argument("data", help="labelled structures, any ASE-readable file (extxyz first)")
    p.add_argument("--out", help="write the metrics to this JSON file")
    p.add_argument("--plots", help="write parity/calibration PNGs into this folder")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # overrides may follow options (`train CONFIG --out DIR key=value`), which argparse leaves unparsed
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "train" or any(e.startswith("-") or "=" not in e for e in extra)):
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
