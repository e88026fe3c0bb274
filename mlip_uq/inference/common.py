"""Run-time helpers the training methods share: minibatches, devices, one MAP fit with a final state file,
checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
from nequip.data import AtomicDataDict

from ..data import collate
from ..files import atomic_write, load_checkpoint
from .map import MAPSettings, fit_map


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
    """:func:`~mlip_uq.inference.map.fit_map` with a final state file: ``out_dir/final.pt`` is written
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
