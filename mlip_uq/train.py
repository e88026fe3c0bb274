"""``mlip-uq train``: data → splits → model → training method → posterior file, metrics and plots."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from ase.data import atomic_numbers
from nequip.data import AtomicDataDict

from .config import ConfigError, RunConfig, check_resumed_config, dump_config, load_config
from .data import FrameStore, filter_frames, fit_energy_references, frames_fingerprint, read_frames
from .data.splits import Split
from .evaluate import metrics_and_plots, predict_graphs
from .files import write_json
from .inference import FitContext, load_method
from .model import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Graphs of each split, the element list, energy references and the training-data fingerprint."""

    type_names: List[str]
    energy_references: Dict[str, float]
    train: List[AtomicDataDict.Type]
    val: List[AtomicDataDict.Type]
    test: List[AtomicDataDict.Type]
    indices: Dict[str, List[int]]
    fingerprint: str
    fitted_energies: Dict[str, float]


def _split(frames, kept: np.ndarray, split: Split, seed: int, references: Dict[str, float]) -> Dict[str, np.ndarray]:
    """The split of the kept frames (``kept``: their indices in ``frames``), as indices into ``frames``."""
    local = split.split([frames[i] for i in kept], seed, references)
    return {name: kept[np.asarray(idx, dtype=int)] for name, idx in local.items()}


def _subsample(indices: np.ndarray, n: Optional[int], rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= len(indices):
        return indices
    return np.sort(rng.choice(indices, size=n, replace=False))


def prepare_data(config: RunConfig, out_dir: Path) -> PreparedData:
    """Read, validate, filter and split the data of a run configuration; neighbour lists come from (and go
    to) the HDF5 frame store, so a data set is prepared once."""
    data, model, seed = config.data, config.model, config.seed
    frames = read_frames(data.path, keys=data.keys, type_names=model.type_names, min_distance=data.min_distance)
    type_names = model.type_names or sorted(
        {s for a in frames for s in a.get_chemical_symbols()}, key=lambda s: atomic_numbers[s]
    )
    refs = data.energy_references
    given_refs = isinstance(refs, dict)
    filter_refs = refs if given_refs else fit_energy_references(frames, type_names)
    _, keep = filter_frames(frames, filter_refs, max_energy_per_atom=data.filter.max_energy_per_atom,
                            max_force=data.filter.max_force)
    kept = np.flatnonzero(keep)
    if len(kept) < len(frames):
        log.info("filter dropped %d of %d structures", len(frames) - len(kept), len(frames))
    split = _split(frames, kept, data.split, seed, filter_refs)
    rng = np.random.default_rng(seed)
    for name in ("train", "val", "test"):
        if name in split:
            split[name] = _subsample(split[name], getattr(data, f"n_{name}"), rng)
    if len(split["train"]) == 0 or len(split.get("val", [])) == 0:
        raise ConfigError(f"the split leaves {len(split['train'])} training and {len(split.get('val', []))} validation structures")
    train_frames = [frames[i] for i in split["train"]]
    fitted = fit_energy_references(train_frames, type_names, start=refs if given_refs else None)
    references = {k: float(v) for k, v in refs.items()} if given_refs else fitted

    r_max = float(model.config.r_max)
    dtype = getattr(torch, model.config.dtype)
    store_path = Path(data.store or out_dir / "data.h5")
    store = FrameStore.for_frames(store_path, frames, type_names, r_max, source=data.path)
    graphs = {name: store.graphs(idx.tolist(), dtype=dtype) for name, idx in split.items()}
    if data.test_path:
        test_frames = read_frames(data.test_path, keys=data.keys, type_names=type_names,
                                  min_distance=data.min_distance)
        test_idx = _subsample(np.arange(len(test_frames)), data.n_test, rng)
        test_store = FrameStore.for_frames(store_path.with_name(store_path.stem + "_test.h5"), test_frames,
                                           type_names, r_max, source=data.test_path)
        graphs["test"] = test_store.graphs(test_idx.tolist(), dtype=dtype)
        split["test"] = test_idx
    return PreparedData(
        type_names=type_names,
        energy_references=references,
        train=graphs["train"],
        val=graphs["val"],
        test=graphs.get("test", []),
        indices={k: v.tolist() for k, v in split.items()},
        fingerprint=frames_fingerprint(train_frames),
        fitted_energies=fitted,
    )


def model_config_from_data(config: RunConfig, data: PreparedData) -> ModelConfig:
    """The model configuration with dataset statistics filled in where the run configuration leaves them out
    (:attr:`~mlip_uq.config.ModelSection.from_data`).

    ``model.energy_shifts``: ``fit`` (default) = per-element energies least-squares fitted on the training
    structures, so the network learns only the deviations from a composition-linear baseline; ``references``
    = the data's energy references (e.g. isolated-atom energies: exact isolated-atom limit, slower training);
    or a mapping element → eV. Energy scale = training force RMS (eV/Å); ``avg_num_neighbors`` = training mean.
    """
    model = config.model
    shifts = model.energy_shifts
    values: Dict[str, Any] = {"energy_shifts": data.fitted_energies if shifts == "fit" else
                              data.energy_references if shifts == "references" else dict(shifts)}
    if "type_names" in model.from_data:
        values["type_names"] = data.type_names
    if "energy_scale" in model.from_data:
        forces = torch.cat([g[AtomicDataDict.FORCE_KEY] for g in data.train])
        values["energy_scale"] = float(forces.square().mean().sqrt())
    if "avg_num_neighbors" in model.from_data:
        edges = sum(g[AtomicDataDict.EDGE_INDEX_KEY].shape[1] for g in data.train)
        atoms = sum(g[AtomicDataDict.POSITIONS_KEY].shape[0] for g in data.train)
        values["avg_num_neighbors"] = edges / atoms
    return dataclasses.replace(model.config, **values)


def train(config, out_dir=None, overrides: Iterable[str] = (), resume: bool = False, overwrite: bool = False) -> Path:
    """Run a training configuration (path, dict or :class:`~mlip_uq.config.RunConfig`) with its method (``map``,
    ``sgmcmc``, ``vi``, ``ensemble``, ``dropout``: an entry of :data:`mlip_uq.inference.METHODS`) and return the
    output folder.

    Writes ``posterior.h5``, ``metrics.json`` (test-set metrics, docs/design.md names), ``parity.png`` and the
    resolved ``config.yaml``; checkpoints go to ``checkpoints/``.

    Folder rule: a folder that holds a run (its ``config.yaml``) is continued with ``resume`` (the
    configuration must be the one the run started with, but for ``training.max_epochs``) or replaced with
    ``overwrite``; without either it is refused. ``config.yaml`` is written only once the settings and the data
    are checked, so a run that fails on them leaves the folder as it was.

    Raises:
        ConfigError: the folder holds a run and neither ``resume`` nor ``overwrite`` is given (or both are).
    """
    cfg = load_config(config, overrides)  # every section checked, before the data are prepared
    out = Path(out_dir or Path("runs") / cfg.run_name)
    saved = out / "config.yaml"
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: give one")
    if resume:  # a resumed run may be given more epochs
        check_resumed_config(saved, cfg, load_config, ["training.max_epochs"], "run")
    elif saved.is_file() and not overwrite:
        raise ConfigError(f"{out} already holds a run ({saved.name}); continue it with --resume or replace it "
                          "with --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, out)
    dump_config(cfg, saved)
    write_json(data.indices, out / "splits.json")
    model_config = model_config_from_data(cfg, data)
    context = FitContext(model_config=model_config, train=data.train, val=data.val, settings=cfg.settings,
                         out_dir=out, config=cfg.to_dict(), resume=resume,
                         metadata=dict(energy_references=data.energy_references, data_fingerprint=data.fingerprint))
    posterior = load_method(cfg.method).fit(context)
    eval_set = data.test or data.val
    metrics = metrics_and_plots(predict_graphs(posterior, eval_set, cfg.evaluate.batch_size), out, title=cfg.name)
    metrics["evaluated_on"] = "test" if data.test else "val"
    write_json(metrics, out / "metrics.json")
    return out
