"""Run-time helpers the training methods share: minibatches, devices, one MAP fit with a final state file,
checkpoints, independent jobs in CPU processes."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch
from nequip.data import AtomicDataDict

from ..data import collate
from ..files import atomic_write, load_checkpoint
from .trainer import MAPSettings, fit_map


def minibatch(graphs: List[AtomicDataDict.Type], batch_size: int, seed: int, step: int) -> AtomicDataDict.Type:
    """The minibatch of ``step``: epochs of a seeded permutation, a pure function of (seed, step) so that a
    resumed chain sees exactly the batches it would have seen."""
    per_epoch = max(1, len(graphs) // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return collate([graphs[i] for i in order[position * batch_size : (position + 1) * batch_size]])


def resolve_device(accelerator: str) -> torch.device:
    """The torch device of an ``accelerator`` setting: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(accelerator)


def fit_map_once(model: torch.nn.Module, train: List[AtomicDataDict.Type], val: List[AtomicDataDict.Type],
                 settings: MAPSettings, out_dir: Path, seed: int, resume: bool) -> Dict[str, torch.Tensor]:
    """:func:`~mlip_uq.inference.trainer.fit_map` with a final state file: ``out_dir/final.pt`` is written
    atomically when training ends.

    With ``resume``, a finished run (``final.pt`` present) is loaded, not trained again, and an unfinished one
    continues from ``out_dir/checkpoints/last.ckpt`` when it has one (else it starts afresh). Without
    ``resume`` the model is trained from its current parameters.
    """
    out_dir = Path(out_dir)
    final = out_dir / "final.pt"
    if resume and final.is_file():
        return load_checkpoint(final)
    has_checkpoint = (out_dir / "checkpoints" / "last.ckpt").is_file()
    state = fit_map(model, train, val, settings, out_dir, seed=seed, resume=resume and has_checkpoint)
    with atomic_write(final) as tmp:
        torch.save(state, tmp)
    return state


def save_checkpoint(state: Dict, path: Path) -> None:
    """``torch.save`` a checkpoint (plain tensors and numbers, loadable with ``weights_only=True``) atomically."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


_WORKER: Dict[str, Any] = {}  # in a worker process: the keyword arguments every job it runs shares


def _worker_start(threads: int, level: int, shared: Dict[str, Any]) -> None:
    """A worker process: nequip's global state, its share of the cores, log lines at the parent's level, and
    the shared arguments (sent once per process, not once per job)."""
    from nequip.utils.global_state import set_global_state

    set_global_state()
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format=f"[process {os.getpid()}] %(message)s")
    _WORKER.update(shared)


def _run_job(fn: Callable, job: Any) -> Any:
    return fn(job, **_WORKER)


def run_in_processes(fn: Callable, jobs: Sequence[Any], n_processes: int, accelerator: str = "cpu",
                     **shared) -> List[Any]:
    """``[fn(job, **shared) for job in jobs]``, ``n_processes`` jobs at a time in spawned CPU processes that
    share the cores (``cpu_count // n_processes`` threads each), or one after the other in this process when
    ``n_processes`` is 1 or ``accelerator`` resolves to a GPU.

    ``fn`` must be a module-level function (it is pickled to the workers); a job's error is raised after the
    other jobs have finished. Used for ensemble members and SG-MCMC starts: small systems, whose tensors are too
    small for several threads per model to pay.
    """
    n_processes = min(int(n_processes), len(jobs))
    device = resolve_device(accelerator)
    if n_processes <= 1 or device.type != "cpu":
        if n_processes > 1:
            logging.getLogger(__name__).info("%d jobs one after the other on %s", len(jobs), device)
        return [fn(job, **shared) for job in jobs]
    threads = max(1, (os.cpu_count() or 1) // n_processes)
    logging.getLogger(__name__).info("%d jobs in %d processes of %d thread(s)", len(jobs), n_processes, threads)
    context = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_processes, mp_context=context, initializer=_worker_start,
                             initargs=(threads, logging.getLogger().getEffectiveLevel(), shared)) as pool:
        futures = [pool.submit(_run_job, fn, job) for job in jobs]
        return [future.result() for future in futures]
