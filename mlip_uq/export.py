"""Every posterior sample (and the posterior-mean model, where one model is exact) in nequip's deployment format.

What is written (``export_posterior``; ``mlip-uq export POSTERIOR --out DIR``)
-----------------------------------------------------------------------------
``DIR/sample_000.nequip.zip``, ... one per sample, ``DIR/mean.nequip.zip`` where exact, and ``DIR/manifest.json``
(sample weights and files, type names, cutoff, dtype, the recalibration, each sample's observation-noise stds,
how they were checked). Each ``.nequip.zip`` is a **nequip package**: the archive ``nequip-package build`` writes
(a ``torch.package`` zip holding the eager model ``model/eager_model.pkl`` as a ``ModuleDict`` under
``sole_model``, the e3nn/nequip code it needs, ``package_metadata.txt``, ``config.yaml`` and the
``example_data.pkl`` that AOT compilation needs), in format version :data:`PACKAGE_FORMAT_VERSION` of nequip 0.19.
nequip loads it with its own machinery, without mlip_uq installed: ``nequip.model.ModelFromPackage`` /
``nequip.model.saved_models.load_utils.load_saved_model``, its ASE calculator
(``nequip.integrations.ase.NequIPCalculator._from_saved_model(path)``, private in 0.19), a training config
(``model: {_target_: nequip.model.ModelFromPackage, package_path: ...}``), and ``nequip-compile`` turns it into
what ``pair_nequip`` (LAMMPS) or ``NequIPCalculator.from_compiled_model`` load::

    nequip-compile DIR/sample_000.nequip.zip sample_000.nequip.pt2 --mode aotinductor --device cpu --target pair_nequip

(torch >= 2.10 allows only ``--mode aotinductor``: it compiles C++ for the target machine and torch version;
compile there, not here).

Why not ``nequip-package build`` itself
---------------------------------------
``nequip-package`` and ``nequip-compile`` read a *nequip training checkpoint*: a Lightning checkpoint of nequip's
training module whose hydra config (``_target_``) rebuilds the model and its data module. A posterior has
neither: its samples are state dicts of :func:`mlip_uq.model.build_model`, which is nequip's ``NequIPGNNModel``
plus mlip_uq's observation-noise block (and, for MC dropout, a dropout wrapper of the nonlinearities). The
minimal exact route, taken here: the energy model of each sample *is* a plain ``nequip.model.NequIPGNNModel``
with the same hyper-parameters (:func:`~mlip_uq.model.build.nequip_model_kwargs`) — the noise block and noise head write only the
log-stds of the likelihood, never the energy, and dropout is the identity in eval mode — so that model is built
by nequip's own builder, the sample's tensors other than the noise ones are loaded into it (strictly: every
tensor must fit), and it is packaged the way ``nequip-package build`` packages a model (same exporter rules:
nequip's interned/extern/mock module lists). The package's ``config.yaml`` holds the ``_target_`` config that
rebuilds the architecture. Every package is checked after writing (``verify``): loaded back through nequip's
``ModelFromPackage`` and evaluated on its example structure, it must give the sample's energy and forces (or the
posterior-mean energy and forces for ``mean``), 1e-6 relative in float64, 1e-4 in float32; the deviations go in
the manifest.

What an exported model does not carry: the observation noise (the aleatoric part of every std; the manifest
lists each sample's noise stds per element, and a noise head's per-atom factor is lost), and the recalibration
(in the manifest). Committee uncertainty from the exported samples is computed the way
:mod:`mlip_uq.posterior.predict` does: weighted mean and variance over samples (manifest weights).

The posterior-mean model
------------------------
One model gives the posterior-mean energy (and so forces and stress) exactly when the energy is linear in the
tensors that differ between samples: E = Σ_i s_t(i) · (W · h_i) + b_t(i) with a shared trunk and readout
hidden layer (features h_i), the readout's last linear layer W, per-type scales s and shifts b. Then the weighted mean of the
sampled tensors gives Σ_k w_k E_k. Exact (:func:`mean_model_exactness`): sampled energy tensors within {the readout's
last linear layer, shifts} or within {scales, shifts}; observation-noise tensors do not matter; a posterior of one sample
or of identical samples is exact too. Anything else (a sampled trunk, a hidden readout layer, readout and scales
both sampled) is not: ``mean="require"`` raises a ValueError naming the tensors, ``"auto"`` writes no mean model
and says why in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import ase
import numpy as np
import torch
from nequip.data import AtomicDataDict

from .files import atomic_write
from .model import ModelConfig
from .model.build import nequip_model_kwargs
from .posterior import Posterior, load_posterior

log = logging.getLogger(__name__)

#: ``package_version_id`` of the archives written here: the format of nequip 0.19's ``nequip-package build``
PACKAGE_FORMAT_VERSION = 2
PACKAGE_SUFFIX = ".nequip.zip"
MANIFEST = "manifest.json"
MEAN_CHOICES = ("auto", "require", "none")
#: relative tolerance of the check of each written package, by dtype
VERIFY_RTOL = {"float64": 1e-6, "float32": 1e-4}

_PREFIX = "model.func."
_NOISE_PREFIXES = (_PREFIX + "observation_noise.", _PREFIX + "noise_head.")
_READOUT = _PREFIX + "per_atom_energy_readout."
_SCALES = _PREFIX + "per_type_energy_scale_shift.scales"
_SHIFTS = _PREFIX + "per_type_energy_scale_shift.shifts"
_SOLE_MODEL_KEY = "sole_model"  # nequip.train.lightning._SOLE_MODEL_KEY
_EAGER_MODEL_KEY = "eager"  # nequip.model.utils._EAGER_MODEL_KEY


def _is_noise(name: str) -> bool:
    return name.startswith(_NOISE_PREFIXES)


def nequip_model(config: ModelConfig, state: Dict[str, torch.Tensor]):
    """A plain ``nequip.model.NequIPGNNModel`` (eval mode) holding ``state`` (a full state dict of
    ``build_model(config)``) less its observation-noise tensors.

    Raises:
        ValueError: a tensor of ``state`` that the nequip model does not have, or the reverse (a different
            architecture: the export would not be exact).
    """
    from nequip.model import NequIPGNNModel

    model = NequIPGNNModel(**nequip_model_kwargs(config))
    energy_state = {n: t for n, t in state.items() if not _is_noise(n)}
    missing, unexpected = model.load_state_dict(energy_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the posterior's model is not a plain nequip NequIPGNNModel plus observation noise: "
                         f"tensors missing from it {missing[:5]}, tensors nequip's model lacks {unexpected[:5]}")
    return model.eval()


def mean_model_exactness(posterior: Posterior) -> Tuple[bool, str]:
    """``(exact, why)``: whether one model with the weighted mean of the sampled tensors gives the posterior-mean
    energy exactly (module docstring), and the reason, naming the tensors that prevent it."""
    sampled = [n for n in posterior.samples if not _is_noise(n)]
    varying = [n for n in sampled if not bool((posterior.samples[n] == posterior.samples[n][:1]).all())]
    if posterior.n_samples == 1 or not varying:
        return True, "the samples agree on every tensor the energy depends on"
    readout = {n for n in varying if n.startswith(_READOUT)}
    scales, shifts = {n for n in varying if n == _SCALES}, {n for n in varying if n == _SHIFTS}
    others = sorted(set(varying) - readout - scales - shifts)
    if others:
        return False, (f"the energy is not linear in the sampled tensors: {others[:6]}"
                       + (" ..." if len(others) > 6 else "") + " are sampled (a mean model is exact only when the "
                       "sampled tensors are the linear readout and/or the per-type shifts, or the scales and shifts)")
    layers = sorted((n for n in (*posterior.shared, *posterior.samples) if n.startswith(_READOUT)),
                    key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    inner = sorted(readout - {layers[-1]}) if layers else sorted(readout)
    if inner:
        return False, (f"the readout has a hidden layer (readout_hidden_width = {posterior.config.readout_hidden_width})"
                       f" and {inner}, before its last linear layer, are sampled: the energy is not linear in them")
    if readout and scales:
        return False, f"both the readout {sorted(readout)} and the per-type scales are sampled: their product is not linear"
    return True, "only " + " and ".join(sorted(readout | scales | shifts)) + " are sampled: the energy is linear in them"


def mean_state(posterior: Posterior) -> Dict[str, torch.Tensor]:
    """The full state dict whose sampled tensors are the weighted means over the samples."""
    w = posterior.weights
    state = dict(posterior.shared)
    for name, t in posterior.samples.items():
        state[name] = (w.to(t.dtype).view(-1, *([1] * (t.dim() - 1))) * t).sum(0)
    return state


def example_structure(type_names, r_max: float, seed: int = 0) -> ase.Atoms:
    """A small periodic structure with three atoms of each element, spaced so that every atom has neighbours
    within ``r_max``: the example data that AOT compilation of a package traces with."""
    symbols = [s for s in type_names for _ in range(3)]
    side = int(math.ceil(len(symbols) ** (1 / 3)))
    spacing = min(2.0, 0.6 * r_max)
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])[: len(symbols)]
    atoms = ase.Atoms(symbols, positions=spacing * grid, cell=[spacing * side + 0.5] * 3, pbc=True)
    atoms.rattle(stdev=0.05, seed=seed)
    return atoms


def example_data(atoms: ase.Atoms, config: ModelConfig) -> AtomicDataDict.Type:
    """``atoms`` as the batched nequip graph (float64 positions, neighbour list at ``r_max``) a package keeps."""
    from .data import atoms_to_graph, collate

    graph = atoms_to_graph(atoms, config.type_names, config.r_max, dtype=torch.float64, with_labels=False)
    return collate([graph])


def write_package(model, path: Union[str, Path], data: AtomicDataDict.Type, config_text: str) -> Path:
    """Write ``model`` (a nequip ``GraphModel``) as a nequip package at ``path`` (``*.nequip.zip``), atomically:
    the layout and exporter rules of ``nequip-package build`` (module docstring), eager model only."""
    import yaml
    from nequip.model.saved_models.package import _suppress_package_importer_exporter_warnings
    from nequip.scripts._package_utils import _EXTERNAL_MODULES, _INTERNAL_MODULES, _MOCK_MODULES
    from nequip.utils.versions import get_current_code_versions
    from nequip.utils.versions.version_utils import get_version_safe

    path = Path(path)
    if not path.name.endswith(PACKAGE_SUFFIX):
        raise ValueError(f"a nequip package must be named *{PACKAGE_SUFFIX}, got {path.name}")
    metadata = {
        "versions": get_current_code_versions(verbose=False),
        "external_modules": {k: get_version_safe(k) for k in _EXTERNAL_MODULES},
        "package_version_id": PACKAGE_FORMAT_VERSION,
        "available_models": [_EAGER_MODEL_KEY],
        "atom_types": dict(enumerate(model.type_names)),
    }
    models = torch.nn.ModuleDict({_SOLE_MODEL_KEY: model.to("cpu")})
    with atomic_write(path) as tmp, _suppress_package_importer_exporter_warnings():
        with torch.package.PackageExporter(str(tmp), importer=(torch.package.importer.sys_importer,)) as exp:
            exp.mock([f"{pkg}.**" for pkg in _MOCK_MODULES])
            exp.extern([f"{pkg}.**" for pkg in _EXTERNAL_MODULES])
            exp.intern([f"{pkg}.**" for pkg in _INTERNAL_MODULES])
            exp.save_pickle(package="model", resource="example_data.pkl", obj=data, dependencies=True)
            exp.save_text("model", "config.yaml", config_text)
            exp.save_text("model", "package_metadata.txt", yaml.dump(metadata, default_flow_style=False))
            exp.save_pickle(package="model", resource=f"{_EAGER_MODEL_KEY}_model.pkl", obj=models, dependencies=True)
    return path


def load_package(path: Union[str, Path]):
    """The eager model of a nequip package, loaded by nequip's own ``ModelFromPackage`` (eval mode)."""
    from nequip.model.saved_models.package import ModelFromPackage

    return ModelFromPackage(str(path), compile_mode=_EAGER_MODEL_KEY)[_SOLE_MODEL_KEY].eval()


def _energy_forces(model, data: AtomicDataDict.Type) -> Tuple[np.ndarray, np.ndarray]:
    out = model(AtomicDataDict.to_(dict(data), torch.device("cpu")))
    return (out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().double().numpy().reshape(-1),
            out[AtomicDataDict.FORCE_KEY].detach().double().numpy())


def _deviation(got, expected) -> float:
    """Largest |got - expected| relative to max(1, largest |expected|)."""
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))


def _noise(posterior: Posterior, k: int) -> Dict:
    """Sample ``k``'s observation-noise stds (eV/Å per element, eV/atom, eV/Å³)."""
    state = posterior.state_dict(k)

    def std(name):
        key = f"{_PREFIX}observation_noise.{name}"
        return torch.exp(state[key + "_log_sigma0"] + state[key + "_log_factor"]).double().tolist()

    return {"force_std": dict(zip(posterior.config.type_names, std("force"))),
            "energy_per_atom_std": std("energy")[0], "stress_std": std("stress")[0],
            "heteroscedastic_head": posterior.config.noise == "head"}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return np.asarray(value).tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def export_posterior(
    posterior: Union[Posterior, str, Path],
    out_dir: Union[str, Path],
    mean: str = "auto",
    dtype: Optional[str] = None,
    structure: Optional[ase.Atoms] = None,
    verify: bool = True,
) -> Dict:
    """Write every sample (and the mean model) as nequip packages plus ``manifest.json`` (module docstring).

    Args:
        posterior: a :class:`~mlip_uq.posterior.Posterior` or a posterior file.
        out_dir: the folder (created; files of an earlier export with the same names are replaced atomically).
        mean: ``"auto"`` (the mean model where exact), ``"require"`` (raise where it is not), ``"none"``.
        dtype: ``"float32"`` or ``"float64"`` for the exported models (default: the posterior's).
        structure: example structure kept in each package for ``nequip-compile`` and used for the check (default:
            :func:`example_structure`); elements must be the model's.
        verify: load every package back through nequip and compare energy and forces (module docstring).

    Returns:
        The manifest (as written to ``out_dir/manifest.json``).

    Raises:
        ValueError: ``mean="require"`` where one model is not exact (names the tensors), a bad ``mean`` or
            ``dtype``, a model that is not a plain NequIP model plus noise, or a package that does not reproduce
            its sample within :data:`VERIFY_RTOL`.
    """
    from .posterior.predict import predict_samples, predictive_moments
    from .uq.calibration import describe

    if mean not in MEAN_CHOICES:
        raise ValueError(f"mean must be one of {list(MEAN_CHOICES)}, got {mean!r}")
    if dtype not in (None, "float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if not isinstance(posterior, Posterior):
        source = str(posterior)
        posterior = load_posterior(posterior)
    else:
        source = None
    posterior = posterior.as_dtype(dtype or posterior.config.dtype).to("cpu")
    config = posterior.config
    exact, why = mean_model_exactness(posterior)
    if mean == "require" and not exact:
        raise ValueError(f"the posterior-mean model cannot be exported exactly: {why}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = example_data(structure if structure is not None else example_structure(config.type_names, config.r_max),
                        config)
    kwargs = nequip_model_kwargs(config)
    rtol = VERIFY_RTOL[config.dtype]
    start = time.perf_counter()

    def config_text(what: str) -> str:
        import yaml

        return yaml.dump({"exported_by": "mlip_uq export", "what": what,
                          "model": {"_target_": "nequip.model.NequIPGNNModel", **kwargs}}, sort_keys=False)

    def export(model, name: str, what: str, reference) -> Dict:
        path = write_package(model, out_dir / name, data, config_text(what))
        entry = {"file": name}
        if verify:
            energy, forces = _energy_forces(load_package(path), data)
            entry["verified"] = {"max_rel_energy_deviation": _deviation(energy, reference[0]),
                                 "max_rel_force_deviation": _deviation(forces, reference[1])}
            worst = max(entry["verified"].values())
            if not worst <= rtol:
                raise ValueError(f"{path}: the package loaded by nequip deviates from {what} by {worst:.3g} "
                                 f"(relative; tolerance {rtol:g} in {config.dtype})")
        return entry

    samples = []
    for k in range(posterior.n_samples):
        own = _energy_forces(_uq_model(posterior, k), data) if verify else None
        entry = export(nequip_model(config, posterior.state_dict(k)), f"sample_{k:03d}{PACKAGE_SUFFIX}",
                       f"sample {k}", own)
        samples.append({"index": k, "weight": float(posterior.weights[k]), **entry, "noise": _noise(posterior, k)})
    mean_entry = {"exact": exact, "why": why, "file": None}
    if exact and mean != "none":
        reference = None
        if verify:
            moments = predictive_moments(predict_samples(posterior, data))
            reference = (np.asarray(moments.energy).reshape(-1), np.asarray(moments.forces))
        mean_entry.update(export(nequip_model(config, mean_state(posterior)), f"mean{PACKAGE_SUFFIX}",
                                 "the posterior mean", reference))
    manifest = {
        "format": "nequip-package",
        "package_version_id": PACKAGE_FORMAT_VERSION,
        "exported_by": "mlip_uq export",
        "posterior": source,
        "method": posterior.method,
        "n_samples": posterior.n_samples,
        "weights": [float(w) for w in posterior.weights],
        "type_names": list(config.type_names),
        "r_max": float(config.r_max),
        "dtype": config.dtype,
        "energy_references": _jsonable(posterior.energy_references),
        "calibration": _jsonable(posterior.calibration),
        "calibration_summary": describe(posterior.calibration),
        "stochastic_tensors": [n for n in posterior.samples if not _is_noise(n)],
        "samples": samples,
        "mean_model": mean_entry,
        "verify_rtol": rtol if verify else None,
        "combine": ("forces: weighted mean over the samples' forces (weights above); epistemic variance: weighted "
                    "variance over samples; aleatoric: each sample's noise std squared (noise), weighted mean; "
                    "std = sqrt(epistemic + aleatoric) times the recalibration (calibration)"),
        "nequip_model": {"_target_": "nequip.model.NequIPGNNModel", **kwargs},
        "load": {"python": "nequip.model.ModelFromPackage(path)['sole_model'] or "
                           "nequip.integrations.ase.NequIPCalculator._from_saved_model(path)",
                 "compile": "nequip-compile PACKAGE OUT.nequip.pt2 --mode aotinductor --device cpu "
                            "--target pair_nequip (or --target ase)"},
        "seconds": round(time.perf_counter() - start, 2),
    }
    with atomic_write(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("export: %d sample(s)%s as nequip packages in %s (%.1f s)", posterior.n_samples,
             " and the mean model" if mean_entry["file"] else "", out_dir, manifest["seconds"])
    return manifest


def _uq_model(posterior: Posterior, k: int):
    """Sample ``k`` as mlip_uq's own model (``build_model``), eval mode: the reference of the check."""
    from .model import build_model

    model = build_model(dataclasses.replace(posterior.config))
    model.load_state_dict(posterior.state_dict(k), strict=True)
    return model.eval()


def list_packages(manifest: Dict, out_dir: Union[str, Path]) -> List[Path]:
    """The package files a manifest names (samples, then the mean model if any)."""
    out_dir = Path(out_dir)
    files = [out_dir / s["file"] for s in manifest["samples"]]
    if manifest["mean_model"].get("file"):
        files.append(out_dir / manifest["mean_model"]["file"])
    return files
