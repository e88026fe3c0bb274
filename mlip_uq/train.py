"""``mlip-uq train``: data → splits → model → training method → posterior file, metrics and plots."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Optional, Union

import numpy as np
import torch
from ase.data import atomic_numbers
from nequip.data import AtomicDataDict

from .config import ConfigError, check_resumed_config, check_type, dump_config, load_config, settings_from
from .data import (
    FrameStore,
    LabelKeys,
    cell_size_split,
    cluster_split,
    filter_frames,
    fit_energy_references,
    frames_fingerprint,
    property_range_split,
    random_split,
    read_frames,
    referenced_energy_per_atom,
)
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


#: the options of the ``data`` section and their types (defaults in :data:`mlip_uq.config.BASE_DEFAULTS`)
DATA_OPTIONS = {
    "path": str, "test_path": Optional[str], "keys": dict,
    "energy_references": Union[Literal["fit"], Dict[str, float]], "filter": dict, "split": dict,
    "n_train": Optional[int], "n_val": Optional[int], "n_test": Optional[int], "min_distance": float,
    "store": Optional[str],
}
FILTER_OPTIONS = {"max_energy_per_atom": Optional[float], "max_force": Optional[float]}
_FRACTIONS = {"val_fraction": float, "test_fraction": float}
_CLUSTERS = {"test_clusters": Optional[List[str]], "test_fraction": float, "n_clusters": int, "val_fraction": float,
             "r_max": float, "n_bins": int}
#: per ``data.split.kind``: its options and their types (the arguments of :mod:`mlip_uq.data.splits`'s functions)
SPLIT_OPTIONS = {"random": _FRACTIONS, "property_range": _FRACTIONS, "composition": _CLUSTERS, "kmeans": _CLUSTERS,
                 "cell_size": {"max_train_atoms": int, "val_fraction": float}}
SPLIT_REQUIRED = {"random": ("val_fraction", "test_fraction"), "property_range": ("val_fraction", "test_fraction"),
                  "cell_size": ("max_train_atoms",)}


def check_data_section(data: Dict) -> None:
    """Check the names and types of the ``data`` options, of ``data.keys``, ``data.filter`` and of
    ``data.split`` (for its ``kind``), before any file is read.

    Raises:
        ConfigError: an unknown or missing option, or a value of the wrong type; the error names the key, the
            value and what is expected.
    """
    def check(section: Dict, options: Dict, name: str, known_for: str = "") -> None:
        unknown = set(section) - set(options)
        if unknown:
            raise ConfigError(f"unknown {name} option(s) {sorted(unknown)}{known_for}; known: {sorted(options)}")
        for key, value in section.items():
            check_type(value, options[key], f"{name}.{key}")

    check(data, DATA_OPTIONS, "data")
    settings_from(LabelKeys, data["keys"], "data.keys")
    check(data["filter"], FILTER_OPTIONS, "data.filter")
    split = dict(data["split"])
    kind = split.pop("kind", "random")
    if kind not in SPLIT_OPTIONS:
        raise ConfigError(f"data.split.kind={kind!r}: expected one of {', '.join(SPLIT_OPTIONS)}")
    check(split, SPLIT_OPTIONS[kind], "data.split", f" for kind {kind}")
    given = set(split) | ({"test_fraction"} if data["test_path"] else set())  # a test file: no test part
    missing = [k for k in SPLIT_REQUIRED.get(kind, ()) if k not in given]
    if missing:
        raise ConfigError(f"data.split of kind {kind} needs {', '.join(missing)}")


def _split(frames, kept: np.ndarray, split: Dict, seed: int, has_test_file: bool,
           references: Dict[str, float]) -> Dict[str, np.ndarray]:
    split = dict(split)
    kind = split.pop("kind", "random")
    if has_test_file:
        split["test_fraction"] = 0.0
    sub = [frames[i] for i in kept]
    if kind == "random":
        local = random_split(len(sub), seed=seed, **split)
    elif kind == "property_range":
        # referenced energies per atom, comparable across compositions
        local = property_range_split(referenced_energy_per_atom(sub, references), seed=seed, **split)
    elif kind in ("composition", "kmeans"):
        local = cluster_split(sub, by=kind, seed=seed, **split)
    elif kind == "cell_size":
        local = cell_size_split(sub, seed=seed, **split)
    else:
        raise ConfigError(f"data.split.kind {kind!r} unknown; use random, property_range, composition, kmeans or cell_size")
    return {name: kept[np.asarray(idx, dtype=int)] for name, idx in local.items()}


def _subsample(indices: np.ndarray, n: Optional[int], rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= len(indices):
        return indices
    return np.sort(rng.choice(indices, size=n, replace=False))


def prepare_data(config: Dict, out_dir: Path) -> PreparedData:
    """Read, validate, filter and split the data of a run configuration; neighbour lists come from (and go
    to) the HDF5 frame store, so a data set is prepared once."""
    data, model_cfg, seed = config["data"], config["model"], int(config["seed"])
    keys = settings_from(LabelKeys, data["keys"], "data.keys")
    frames = read_frames(data["path"], keys=keys, type_names=model_cfg.get("type_names"), min_distance=data["min_distance"])
    type_names = model_cfg.get("type_names") or sorted(
        {s for a in frames for s in a.get_chemical_symbols()}, key=lambda s: atomic_numbers[s]
    )
    refs = data["energy_references"]
    given_refs = isinstance(refs, dict)
    filter_refs = refs if given_refs else fit_energy_references(frames, type_names)
    _, keep = filter_frames(frames, filter_refs, **data["filter"])
    kept = np.flatnonzero(keep)
    if len(kept) < len(frames):
        log.info("filter dropped %d of %d structures", len(frames) - len(kept), len(frames))
    split = _split(frames, kept, data["split"], seed, bool(data.get("test_path")), filter_refs)
    rng = np.random.default_rng(seed)
    for name in ("train", "val", "test"):
        if name in split:
            split[name] = _subsample(split[name], data.get(f"n_{name}"), rng)
    if len(split["train"]) == 0 or len(split.get("val", [])) == 0:
        raise ConfigError(f"the split leaves {len(split['train'])} training and {len(split.get('val', []))} validation structures")
    train_frames = [frames[i] for i in split["train"]]
    fitted = fit_energy_references(train_frames, type_names, start=refs if given_refs else None)
    references = {k: float(v) for k, v in refs.items()} if given_refs else fitted

    r_max = float(model_cfg.get("r_max", ModelConfig.r_max))
    dtype = getattr(torch, model_cfg.get("dtype", ModelConfig.dtype))
    store_path = Path(data.get("store") or out_dir / "data.h5")
    store = FrameStore.for_frames(store_path, frames, type_names, r_max, source=data["path"])
    graphs = {name: store.graphs(idx.tolist(), dtype=dtype) for name, idx in split.items()}
    if data.get("test_path"):
        test_frames = read_frames(data["test_path"], keys=keys, type_names=type_names, min_distance=data["min_distance"])
        test_idx = _subsample(np.arange(len(test_frames)), data.get("n_test"), rng)
        test_store = FrameStore.for_frames(store_path.with_name(store_path.stem + "_test.h5"), test_frames,
                                           type_names, r_max, source=data["test_path"])
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


def model_config_from_data(config: Dict, data: PreparedData) -> ModelConfig:
    """The model configuration with dataset statistics filled in where the run configuration leaves them out.

    ``model.energy_shifts``: ``fit`` (default) = per-element energies least-squares fitted on the training
    structures, so the network learns only the deviations from a composition-linear baseline; ``references``
    = the data's energy references (e.g. isolated-atom energies: exact isolated-atom limit, slower training);
    or a mapping element → eV. Energy scale = training force RMS; ``avg_num_neighbors`` = training mean.
    """
    values = dict(config["model"])
    values.setdefault("type_names", data.type_names)
    shifts = values.get("energy_shifts", "fit")
    if shifts == "fit":
        values["energy_shifts"] = data.fitted_energies
    elif shifts == "references":
        values["energy_shifts"] = data.energy_references
    elif not isinstance(shifts, dict):
        raise ConfigError(f"model.energy_shifts must be 'fit', 'references' or a mapping element -> eV, got {shifts!r}")
    if "energy_scale" not in values:
        forces = torch.cat([g[AtomicDataDict.FORCE_KEY] for g in data.train])
        values["energy_scale"] = float(forces.square().mean().sqrt())
    if "avg_num_neighbors" not in values:
        edges = sum(g[AtomicDataDict.EDGE_INDEX_KEY].shape[1] for g in data.train)
        atoms = sum(g[AtomicDataDict.POSITIONS_KEY].shape[0] for g in data.train)
        values["avg_num_neighbors"] = edges / atoms
    values.setdefault("seed", int(config["seed"]))
    return ModelConfig.from_dict(values)


def method_settings(cfg: Dict) -> Any:
    """The typed settings of the configuration's method (its ``Settings.from_dict``; see
    :mod:`mlip_uq.inference`), and the model and data sections' keys, checked before any data are prepared.

    Raises:
        ConfigError: a mistyped option (named with its value and the expected type; model options included),
            an unknown model option,
            ``model.dropout`` with a method that does not train with dropout.
    """
    model = dict(cfg["model"])
    shifts = model.pop("energy_shifts", "fit")  # filled in from the data: checked here for its kind only
    if shifts not in ("fit", "references") and not isinstance(shifts, dict):
        raise ConfigError(f"model.energy_shifts must be 'fit', 'references' or a mapping element -> eV, got {shifts!r}")
    settings_from(ModelConfig, {"type_names": [], **model}, "model")  # types and names of the model options
    check_data_section(cfg["data"])
    return load_method(cfg["method"]).Settings.from_dict(cfg)


def train(config, out_dir=None, overrides: Iterable[str] = (), resume: bool = False, overwrite: bool = False) -> Path:
    """Run a training configuration (path or dict) with its method (``map``, ``sgmcmc``, ``vi``, ``ensemble``,
    ``dropout``: an entry of :data:`mlip_uq.inference.METHODS`) and return the output folder.

    Writes ``posterior.h5``, ``metrics.json`` (test-set metrics, docs/design.md names), ``parity.png`` and the
    resolved ``config.yaml``; checkpoints go to ``checkpoints/``.

    Folder rule: a folder that holds a run (its ``config.yaml``) is continued with ``resume`` (the
    configuration must be the one the run started with, but for ``training.max_epochs``) or replaced with
    ``overwrite``; without either it is refused. ``config.yaml`` is written only once the settings and the data
    are checked, so a run that fails on them leaves the folder as it was.

    Raises:
        ConfigError: the folder holds a run and neither ``resume`` nor ``overwrite`` is given (or both are).
    """
    cfg = load_config(config, overrides)
    out = Path(out_dir or Path("runs") / cfg.get("name", cfg["method"]))
    saved = out / "config.yaml"
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the folder and --overwrite replaces it: give one")
    if resume:  # a resumed run may be given more epochs
        check_resumed_config(saved, cfg, ["training.max_epochs"], "run")
    elif saved.is_file() and not overwrite:
        raise ConfigError(f"{out} already holds a run ({saved.name}); continue it with --resume or replace it "
                          "with --overwrite")
    # settings first, so that a mistyped option is reported before the data are prepared
    settings = method_settings(cfg)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, out)
    dump_config(cfg, saved)
    write_json(data.indices, out / "splits.json")
    model_config = model_config_from_data(cfg, data)
    context = FitContext(model_config=model_config, train=data.train, val=data.val, settings=settings, out_dir=out,
                         config=cfg, resume=resume,
                         metadata=dict(energy_references=data.energy_references, data_fingerprint=data.fingerprint))
    posterior = load_method(cfg["method"]).fit(context)
    eval_set = data.test or data.val
    metrics = metrics_and_plots(
        predict_graphs(posterior, eval_set, cfg["evaluate"]["batch_size"]), out, title=cfg.get("name")
    )
    metrics["evaluated_on"] = "test" if data.test else "val"
    write_json(metrics, out / "metrics.json")
    return out
