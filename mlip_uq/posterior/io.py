"""The posterior file: one HDF5 file, readable with h5py alone, never unpickled.

Layout (format ``mlip_uq.Posterior``, version 1)::

    /                      attributes: format, format_version, package_version, method,
                           hyperparameters (JSON), model_config (JSON), type_names (JSON),
                           energy_references (JSON), calibration (JSON), data_fingerprint
    /shared/<name>         tensors identical for every sample (state-dict names)
    /samples/<name>        stochastic tensors, shape (K, ...)
    /weights               sample weights, shape (K,)

Writes go to a temporary file in the same folder that is renamed over the target, so a reader never sees
a half-written file and an interrupted write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

from .. import __version__
from ..model import ModelConfig
from .posterior import Posterior

FORMAT = "mlip_uq.Posterior"
FORMAT_VERSION = 1


class PosteriorFileError(ValueError):
    """A posterior file is missing, truncated, foreign, or of an unsupported version."""


def atomic_h5_write(path, write) -> None:
    """Call ``write(h5file)`` on a temporary HDF5 file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            write(f)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_posterior(posterior: Posterior, path) -> None:
    """Write ``posterior`` to ``path`` atomically (see the module docstring for the layout)."""

    def write(f: h5py.File) -> None:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["package_version"] = __version__
        f.attrs["method"] = posterior.method
        f.attrs["hyperparameters"] = json.dumps(posterior.hyperparameters)
        f.attrs["model_config"] = json.dumps(posterior.config.to_dict())
        f.attrs["type_names"] = json.dumps(posterior.config.type_names)
        f.attrs["energy_references"] = json.dumps(posterior.energy_references)
        f.attrs["calibration"] = json.dumps(posterior.calibration)
        f.attrs["data_fingerprint"] = posterior.data_fingerprint
        for group, tensors in (("shared", posterior.shared), ("samples", posterior.samples)):
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
        version = int(f.attrs["format_version"])
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
                calibration=json.loads(f.attrs["calibration"]),
                energy_references=json.loads(f.attrs["energy_references"]),
                data_fingerprint=str(f.attrs["data_fingerprint"]),
            )
        except (KeyError, OSError, json.JSONDecodeError) as e:
            raise PosteriorFileError(f"{path} is an incomplete or damaged posterior file: {e}") from e
    posterior = Posterior(config, shared, samples, weights=weights, **meta)
    try:
        posterior.model()  # builds the architecture and loads sample 0 strictly: names and shapes must match
    except RuntimeError as e:
        raise PosteriorFileError(f"{path} does not match its own model config: {e}") from e
    return posterior
