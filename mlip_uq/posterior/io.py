"""The posterior file: one HDF5 file, readable with h5py alone, never unpickled.

Layout (format ``mlip_uq.Posterior``, version 2: the model carries its observation noise)::

    /                      attributes: format, format_version, package_version, method,
                           hyperparameters (JSON), model_config (JSON), type_names (JSON),
                           energy_references (JSON), calibration (JSON), data_fingerprint
    /shared/<name>         tensors identical for every sample (state-dict names)
    /samples/<name>        stochastic tensors, shape (K, ...)
    /weights               sample weights, shape (K,)
    /vi/mean/<name>, /vi/scale/<name>   variational inference only: the fitted mean-field Gaussian
                           (``mlip_uq.inference.vi``); ignored by :func:`load_posterior`
    /calibration_isotonic/<quantity>/std, .../calibrated_std   isotonic recalibration knots, where fitted
                           (the scalar factors are in the ``calibration`` attribute; :mod:`mlip_uq.uq.calibration`)

Writes go to a temporary file in the same folder that is renamed over the target, so a reader never sees
a half-written file and an interrupted write leaves the previous file intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch

from .. import __version__
from ..files import atomic_write
from ..model import ModelConfig, state_layout
from .posterior import Posterior

FORMAT = "mlip_uq.Posterior"
FORMAT_VERSION = 2


class PosteriorFileError(ValueError):
    """A posterior file is missing, truncated, foreign, or of an unsupported version."""


def atomic_h5_write(path, write, update: bool = False) -> None:
    """Call ``write(h5file)`` on a temporary HDF5 file next to ``path`` (with ``update``: a copy of ``path``,
    opened for appending), then rename it into place (:func:`mlip_uq.files.atomic_write`)."""
    with atomic_write(path) as tmp:
        if update:
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a" if update else "w") as f:
            write(f)


def save_posterior(posterior: Posterior, path, extra_groups=None) -> None:
    """Write ``posterior`` to ``path`` atomically (see the module docstring for the layout).

    ``extra_groups``: method-specific tensors ``{group path: {name: tensor}}`` written in the same file (e.g.
    the VI Gaussian, ``{"vi/mean": ..., "vi/scale": ...}``).
    """

    def write(f: h5py.File) -> None:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["package_version"] = __version__
        f.attrs["method"] = posterior.method
        f.attrs["hyperparameters"] = json.dumps(posterior.hyperparameters)
        f.attrs["model_config"] = json.dumps(posterior.config.to_dict())
        f.attrs["type_names"] = json.dumps(posterior.config.type_names)
        f.attrs["energy_references"] = json.dumps(posterior.energy_references)
        _write_calibration(f, posterior.calibration)
        f.attrs["data_fingerprint"] = posterior.data_fingerprint
        for group, tensors in (("shared", posterior.shared), ("samples", posterior.samples),
                               *(extra_groups or {}).items()):
            g = f.create_group(group)
            for name, t in tensors.items():
                g.create_dataset(name, data=t.detach().cpu().numpy())
        f.create_dataset("weights", data=posterior.weights.numpy())

    atomic_h5_write(path, write)


def load_posterior(path) -> Posterior:
    """Read a posterior file written by :func:`save_posterior`, checking it against the architecture."""
    path = Path(path)
    if not path.is_file():
        raise PosteriorFileError(f"posterior file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise PosteriorFileError(f"{path} is not a readable HDF5 file (truncated or not HDF5): {e}") from e
    with f:
        fmt = f.attrs.get("format")
        if fmt != FORMAT:
            raise PosteriorFileError(f"{path} is not an mlip_uq posterior file (format attribute {fmt!r})")
        version = f.attrs.get("format_version")
        if version is None:
            raise PosteriorFileError(f"{path} is an incomplete posterior file: it has no format_version attribute")
        version = int(version)
        if version != FORMAT_VERSION:
            raise PosteriorFileError(
                f"{path} has posterior format version {version}; this mlip_uq reads version {FORMAT_VERSION}"
            )
        try:
            config = ModelConfig.from_dict(json.loads(f.attrs["model_config"]))
            shared = {n: torch.from_numpy(np.asarray(d[()])) for n, d in f["shared"].items()}
            samples = {n: torch.from_numpy(np.asarray(d[()])) for n, d in f["samples"].items()}
            weights = torch.from_numpy(np.asarray(f["weights"][()]))
            meta = dict(
                method=str(f.attrs["method"]),
                hyperparameters=json.loads(f.attrs["hyperparameters"]),
                calibration=_read_calibration(f),
                energy_references=json.loads(f.attrs["energy_references"]),
                data_fingerprint=str(f.attrs["data_fingerprint"]),
            )
        except KeyError as e:  # h5py names the missing attribute, group or dataset
            raise PosteriorFileError(f"{path} is an incomplete posterior file: {e.args[0] if e.args else e}") from e
        except (OSError, TypeError, ValueError) as e:  # damaged data, JSON that is not a model config
            raise PosteriorFileError(f"{path} is a damaged posterior file: {e}") from e
    _check_layout(path, config, shared, samples)
    return Posterior(config, shared, samples, weights=weights, **meta)


def _check_layout(path: Path, config: ModelConfig, shared, samples) -> None:
    """The file's tensors are exactly the state dict of its model config: names and shapes (per sample)."""
    expected = {name: shape for name, (shape, _) in state_layout(config).items()}
    found = {**{n: tuple(t.shape) for n, t in shared.items()}, **{n: tuple(t.shape[1:]) for n, t in samples.items()}}
    problems = []
    if set(expected) - set(found):
        problems.append(f"missing tensors {sorted(set(expected) - set(found))}")
    if set(found) - set(expected):
        problems.append(f"unknown tensors {sorted(set(found) - set(expected))}")
    problems += [f"{n} has shape {found[n]}, the model's is {expected[n]}"
                 for n in sorted(set(found) & set(expected)) if found[n] != expected[n]]
    if problems:
        raise PosteriorFileError(f"{path} does not match its own model config: {'; '.join(problems)}")


def _write_calibration(f: h5py.File, calibration) -> None:
    scalars = {q: float(v) for q, v in calibration.items() if q != "isotonic"}
    f.attrs["calibration"] = json.dumps(scalars)
    if "calibration_isotonic" in f:
        del f["calibration_isotonic"]
    for quantity, knots in calibration.get("isotonic", {}).items():
        for name, values in knots.items():
            f.create_dataset(f"calibration_isotonic/{quantity}/{name}", data=np.asarray(values, dtype=np.float64))


def _read_calibration(f: h5py.File) -> dict:
    calibration = json.loads(f.attrs["calibration"])
    if "calibration_isotonic" in f:
        calibration["isotonic"] = {q: {n: np.asarray(d[()]) for n, d in g.items()}
                                   for q, g in f["calibration_isotonic"].items()}
    return calibration


def write_calibration(path, calibration) -> None:
    """Replace the recalibration stored in the posterior file ``path`` (atomically; the rest of the file,
    including groups this reader does not know, is kept as it is)."""
    load_posterior(path)  # a readable posterior file, or PosteriorFileError
    atomic_h5_write(path, lambda f: _write_calibration(f, calibration), update=True)
