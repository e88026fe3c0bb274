"""Seconds per training epoch of ``mlip-uq train``'s MAP path against a plain nequip + torch Adam loop, and
seconds per SG-MCMC step against a MAP step, side by side in one run; written to docs/benchmarks.md.

Both loops train the same model (``build_model`` of the run configuration: nequip's ``NequIPGNNModel``) on the
same graphs, batch size, learning rate, loss weights and dtype, and both validate once per epoch on the same
validation set (forces by autograd) and step a plateau schedule on it: the work one epoch of training to
convergence needs.

- *ours*: :func:`mlip_uq.inference.trainer.fit_map` (Lightning loop, logging, ``best.ckpt`` at each improvement,
  ``last.ckpt`` every ``training.checkpoint_seconds``, early stopping); the epoch times come from its
  per-epoch log line.
- *plain*: a hand-written loop: per epoch a seeded permutation, ``collate`` of each batch, forward, energy per
  atom and force MSE, backward, ``torch.optim.Adam`` step; then validation and ``ReduceLROnPlateau``.
- *SG-MCMC*: :func:`mlip_uq.inference.sgmcmc.run_sgmcmc` (burn-in, then sampling with noise), seconds per
  minibatch step between its progress lines, less the chain checkpoint written with each (the MAP side's
  training seconds exclude its checkpoints too), against ours' training seconds per MAP batch in the same dtype.

Rounds alternate ours and plain (and SG-MCMC) so that a load change on a shared machine hits both; the first
epoch of each block (warm-up) is dropped and the median over the rest is reported. Targets: ours / plain
<= 1.05 per epoch in float32 and float64; SG-MCMC step / MAP step <= 1.1.

    OMP_NUM_THREADS=1 python scripts/bench_training.py [--data ethanol|tio2] [--rounds 3] [--epochs 5]
        [--sgmcmc-steps 60] [--dtypes float32 float64] [--profile] [--out docs/benchmarks.md] [--report]

``--profile`` adds a cProfile of one short ``fit_map`` and one short ``run_sgmcmc`` run (the functions with the
most own time) to the section. The numbers (medians, ratios, profiles) go with the date and code version to
``docs/bench_training.json``, the section of ``--out`` is written from that file; ``--report`` rewrites it from
the JSON alone.
"""

import argparse
import contextlib
import cProfile
import dataclasses
import io
import json
import logging
import platform
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from _harness import provenance, reading, stamped, update_section

# torch and the mlip_uq modules that import it are imported where they are used: the report stays light

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Training cost per epoch and per step (scripts/bench_training.py)"
CONFIGS = {"ethanol": ROOT / "configs" / "ethanol_map.yaml", "tio2": ROOT / "configs" / "tio2_subset_map.yaml"}
TIO2_BENCH = ["data.n_train=100", "data.n_val=20"]  # a 100-structure slice keeps the TiO2 epochs short


class _Records(logging.Handler):
    """Collect the argument tuples of log records whose message starts with ``prefix`` (``args``) and the
    ``time.perf_counter()`` at which each was logged (``times``)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.args, self.times = prefix, [], []

    def emit(self, record):
        if record.msg.startswith(self.prefix):
            self.args.append(record.args)
            self.times.append(time.perf_counter())


@contextlib.contextmanager
def collecting(logger: str, prefix: str):
    handler = _Records(prefix)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    level = target.level
    target.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


def ours_epochs(model_config, data, settings, work: Path, seed: int):
    """(train seconds, validation seconds, epoch seconds) of each epoch of ``fit_map`` after the first
    (``settings``: the ``MAPSettings``)."""
    from mlip_uq.inference.trainer import fit_map
    from mlip_uq.model import build_model

    with collecting("mlip_uq.inference.trainer", "epoch ") as records, tempfile.TemporaryDirectory(dir=work) as out:
        # stderr off a terminal: fit_map then logs one line per epoch (the timings) instead of a progress bar
        with contextlib.redirect_stderr(io.StringIO()):
            fit_map(build_model(model_config), data.train, data.val, settings, Path(out), seed=seed)
    rows = records.args
    elapsed = [r[-1] for r in rows]
    return [(r[-3], r[-2], b - a) for r, a, b in zip(rows[1:], elapsed, elapsed[1:])]


def plain_epochs(model_config, data, settings, seed: int):
    """The same epochs as a plain loop: nequip model, collate per batch, the same loss, torch Adam, plateau
    schedule."""
    import torch

    from mlip_uq.data import collate
    from mlip_uq.inference.loss import loss_terms, weighted_loss
    from mlip_uq.model import build_model

    torch.manual_seed(seed)
    model = build_model(model_config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=settings.lr_factor,
                                                           patience=settings.lr_patience)
    generator = torch.Generator().manual_seed(seed)
    bs = settings.batch_size

    def loss_of(batch):
        return weighted_loss(loss_terms(model(batch), batch), settings.loss_weights)

    times = []
    for _ in range(settings.max_epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(data.train), generator=generator).tolist()
        for i in range(0, len(order), bs):
            loss = loss_of(collate([data.train[j] for j in order[i:i + bs]]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        t1 = time.perf_counter()
        model.eval()  # as Lightning validates: forces without the graph for a second derivative
        val = sum(float(loss_of(collate(data.val[i:i + bs])).detach()) * len(data.val[i:i + bs])
                  for i in range(0, len(data.val), bs)) / len(data.val)
        model.train()
        scheduler.step(val)
        t2 = time.perf_counter()
        times.append((t1 - t0, t2 - t1, t2 - t0))
    return times[1:]


@contextlib.contextmanager
def timed_checkpoints():
    """Record ``(end time, seconds)`` of every SG-MCMC chain checkpoint written inside the block."""
    from mlip_uq.inference.chains import Chain

    writes, original = [], Chain.save

    def save(chain, path=None):
        start = time.perf_counter()
        original(chain, path)
        writes.append((time.perf_counter(), time.perf_counter() - start))

    Chain.save = save
    try:
        yield writes
    finally:
        Chain.save = original


def sgmcmc_steps(model_config, data, batch_size: int, n_steps: int, work: Path):
    """Seconds per step of ``run_sgmcmc`` (burn-in then sampling, one chain) between its progress lines, the
    chain checkpoint written with each line left out, as the MAP epochs' training seconds leave out theirs (at
    the default ``checkpoint_every`` of 500 a checkpoint costs a chain a fiftieth of what it does here)."""
    from mlip_uq.inference.sgmcmc import SGMCMCSettings, run_sgmcmc

    every = 10
    settings = SGMCMCSettings(lr=1e-4, batch_size=batch_size, burnin_steps=n_steps // 2, preheat_steps=0,
                              n_samples=1, thinning=n_steps - n_steps // 2, checkpoint_every=every,
                              accelerator="cpu")
    with collecting("mlip_uq.inference.chains", "chain %d: step") as records, timed_checkpoints() as writes, \
            tempfile.TemporaryDirectory(dir=work) as out:
        run_sgmcmc(model_config, data.train, settings, Path(out))
    # records.args: (chain, step, end, phase, temperature, N*nll, elapsed) of each progress line
    seconds = []
    for (a, ta), (b, tb) in zip(zip(records.args, records.times), zip(records.args[1:], records.times[1:])):
        written = sum(duration for end, duration in writes if ta < end <= tb)
        seconds.append((tb - ta - written) / (b[1] - a[1]))
    return seconds


def profile(run, work: Path, top: int = 15) -> str:
    """The functions with the most own time in ``run(out_dir)``, as cProfile prints them."""
    import torch

    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(dir=work) as out, contextlib.redirect_stderr(io.StringIO()):
        profiler.enable()
        run(Path(out))
        profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    lines = text.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    prefixes = (str(Path(torch.__file__).parents[1]) + "/", str(ROOT) + "/")  # site-packages, this checkout
    return "\n".join(line.replace(prefixes[0], "").replace(prefixes[1], "") for line in lines[start:]).rstrip()


ACCURACY_RUNS = """\
**Accuracy in the time budget.** `configs/ethanol_map.yaml` and `configs/tio2_subset_map.yaml` train in float32
until the validation loss has converged (plateau schedule down to `min_lr`, or early stopping), with the
benchmark's wall-clock budget as `training.max_time_minutes` (45 and 60 minutes). The runs that measure the
targets (ethanol-50, official test split: energy MAE <= 8.7 meV, force MAE <= 40.2 meV/Å; TiO2 subset, random
90/10: energy RMSE <= 7.8 meV/atom, force RMSE <= 0.20 eV/Å), each alone on the 2 cores:

    OMP_NUM_THREADS=2 mlip-uq train configs/ethanol_map.yaml --out runs/ethanol_map
    OMP_NUM_THREADS=2 mlip-uq train configs/tio2_subset_map.yaml --out runs/tio2_subset_map

`metrics.json` holds the test errors (`energy_mae` in eV/atom: × 9 for meV per ethanol molecule), the log one
line per epoch (the epochs run, seconds of training and validation), `logs/metrics.csv` the curve
(`val_loss`, `val_energy_mae`, `val_forces_mae` per epoch) and `training_curve.png` its plot. The measured
results are in the MAP accuracy section at the top of this page."""


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(CONFIGS), default="ethanol")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per block (the first is dropped)")
    parser.add_argument("--sgmcmc-steps", type=int, default=60, help="SG-MCMC steps per round")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_training")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--report", action="store_true", help="rewrite the section from docs/bench_training.json alone")
    args = parser.parse_args()
    path = ROOT / "docs" / "bench_training.json"
    if args.report:
        record = json.loads(path.read_text())
    else:
        from mlip_uq.files import write_json

        record = measure(args)
        write_json(record, path)
    body = report(record, path)
    update_section(args.out, HEADING, body)
    print(body)


def measure(args) -> dict:
    """Time the epochs and steps of every dtype, interleaved (and profile when asked): the record."""
    import torch
    from nequip.utils.global_state import set_global_state

    from mlip_uq.config import load_config
    from mlip_uq.inference.trainer import fit_map
    from mlip_uq.model import build_model
    from mlip_uq.train import model_config_from_data, prepare_data

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    set_global_state()
    args.runs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    runs = {}
    for dtype in args.dtypes:
        overrides = [f"model.dtype={dtype}", f"data.store={args.runs / (args.data + '.h5')}"]
        cfg = load_config(CONFIGS[args.data], overrides + (TIO2_BENCH if args.data == "tio2" else []))
        data = prepare_data(cfg, args.runs)
        settings = dataclasses.replace(cfg.settings.training, max_epochs=args.epochs, max_time_minutes=None,
                                       accelerator="cpu", devices=1)
        runs[dtype] = (model_config_from_data(cfg, data), data, settings)
    times = {dtype: {"ours": [], "plain": [], "sgmcmc": []} for dtype in args.dtypes}
    for r in range(args.rounds):  # dtypes and loops interleaved: a load change on the machine hits all alike
        for dtype, (model_config, data, settings) in runs.items():
            t = times[dtype]
            t["ours"] += ours_epochs(model_config, data, settings, args.runs, seed=r)
            t["plain"] += plain_epochs(model_config, data, settings, seed=r)
            t["sgmcmc"] += sgmcmc_steps(model_config, data, settings.batch_size, args.sgmcmc_steps, args.runs)
            print(f"{dtype} round {r + 1}/{args.rounds}: ours {median([e for *_, e in t['ours']]):.3f} s/epoch, "
                  f"plain {median([e for *_, e in t['plain']]):.3f} s/epoch, SG-MCMC {median(t['sgmcmc']):.4f} "
                  f"s/step ({time.perf_counter() - started:.0f} s)", flush=True)
    results = {}
    for dtype, (model_config, data, settings) in runs.items():
        t = times[dtype]
        n_batches = -(-len(data.train) // settings.batch_size)
        ours = [median([e[i] for e in t["ours"]]) for i in range(3)]
        plain = [median([e[i] for e in t["plain"]]) for i in range(3)]
        map_step = ours[0] / n_batches
        results[dtype] = {"ours": ours, "plain": plain, "ours_per_plain": ours[2] / plain[2],
                          "sgmcmc_step": median(t["sgmcmc"]), "map_step": map_step,
                          "sgmcmc_per_map": median(t["sgmcmc"]) / map_step}
    model_config, data, settings = runs[args.dtypes[0]]
    n_batches = -(-len(data.train) // settings.batch_size)
    profiles = {}
    if args.profile:
        profiles["fit_map"] = profile(lambda out: fit_map(build_model(model_config), data.train, data.val,
                                                          settings, out), args.runs)
        profiles["run_sgmcmc"] = profile(lambda out: sgmcmc_steps(model_config, data, settings.batch_size,
                                                                  args.sgmcmc_steps, out), args.runs)
    shape = (f"{len(data.train)} training / {len(data.val)} validation structures, batch "
             f"{settings.batch_size} ({n_batches} steps per epoch), {model_config.num_layers} layers, l_max "
             f"{model_config.l_max}, {model_config.num_features} features")
    threads = torch.get_num_threads()
    return stamped({
        "command": f"OMP_NUM_THREADS={threads} python scripts/bench_training.py --data {args.data} --rounds "
                   f"{args.rounds} --epochs {args.epochs} --sgmcmc-steps {args.sgmcmc_steps}"
                   f"{' --profile' if args.profile else ''}",
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": threads,
        "data": args.data, "shape": shape, "rounds": args.rounds, "epochs": args.epochs,
        "sgmcmc_steps": args.sgmcmc_steps, "dtypes": args.dtypes, "minutes": (time.perf_counter() - started) / 60,
        "results": results,
        "float64_per_float32": (results["float64"]["ours"][2] / results["float32"]["ours"][2]
                                if len(results) == 2 else None),
        "profiles": profiles})


def report(record, path: Path) -> str:
    """The section's body (below its heading) from the record alone; the hand-written reading (the record's
    ``reading``, :func:`_harness.reading`) follows the provenance line."""
    lines = [
        f"{record['date']}, {record['machine']}, torch {record['torch']}, {record['threads']} thread(s); data "
        f"`{record['data']}` ({record['shape']}). Command: `{record['command']}` ({record['minutes']:.1f} min). "
        f"Medians over {record['rounds']} interleaved rounds, the first epoch of each block dropped. An epoch = the "
        "training batches + one validation pass over the validation set (forces by autograd) + the plateau "
        "schedule; ours also writes its logs, `best.ckpt` (the best weights) whenever the validation loss "
        "improves and `last.ckpt` (everything `--resume` needs) every `training.checkpoint_seconds` (default 60 s: "
        "inside these short blocks only when training ends, outside the timed epochs).",
        "",
        "| dtype | ours s/epoch (train + val) | plain s/epoch (train + val) | ours / plain (target ≤ 1.05) | "
        "MAP s/step | SG-MCMC s/step | SG-MCMC / MAP (target ≤ 1.1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype, r in record["results"].items():
        (ot, ov, oe), (pt, pv, pe) = r["ours"], r["plain"]
        lines.append(
            f"| {dtype} | {oe:.3f} ({ot:.3f} + {ov:.3f}) | {pe:.3f} ({pt:.3f} + {pv:.3f}) | "
            f"**{r['ours_per_plain']:.3f}** | {r['map_step']:.4f} | {r['sgmcmc_step']:.4f} | "
            f"**{r['sgmcmc_per_map']:.3f}** |"
        )
    if record["float64_per_float32"] is not None:
        lines += ["", f"float64 / float32 per epoch (ours): {record['float64_per_float32']:.2f}x."]
    lines += ["", provenance(record, path), "", reading(record, path), "", ACCURACY_RUNS]
    for name, text in record["profiles"].items():
        what = f"{record['epochs']} epochs" if name == "fit_map" else f"{record['sgmcmc_steps']} steps"
        lines += ["", f"Where one short `{name}` run ({record['dtypes'][0]}, {what}) spends its time (cProfile, "
                  "own time):", "", "```", text, "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
