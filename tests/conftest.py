"""Shared test fixtures: paths to the data files the repository ships in data/ (every test runs from them
alone), small model configurations and posteriors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from nequip.utils.global_state import set_global_state

from mlip_uq.model import ModelConfig, build_model
from mlip_uq.posterior import Posterior

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_TIO2 = REPO_ROOT / "data" / "tio2_aenet_subset_1000.extxyz"
#: the first 200 frames of rMD17 ethanol's official train split 01 and the first 50 of its test split 01 (CC0,
#: shipped in data/, provenance in data/README.md)
BUNDLED_ETHANOL_TRAIN = REPO_ROOT / "data" / "rmd17_ethanol_train_01_200.extxyz"
BUNDLED_ETHANOL_TEST = REPO_ROOT / "data" / "rmd17_ethanol_test_01_50.extxyz"

# nequip models are built under its global state (default dtype float64)
set_global_state()

# a pytest-xdist worker (``make test`` runs two, one per core) computes with one thread: the tiny models of the
# tests gain nothing from intra-op threads, and two workers with two threads each would oversubscribe the cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ethanol_train() -> Path:
    """200 rMD17 ethanol structures of the official train split 01 (CC0, shipped in data/)."""
    return BUNDLED_ETHANOL_TRAIN


@pytest.fixture(scope="session")
def ethanol_test() -> Path:
    """50 rMD17 ethanol structures of the official test split 01 (CC0, shipped in data/)."""
    return BUNDLED_ETHANOL_TEST


def full_data_set(name: str, file: str, shared: str) -> Path:
    """A file of a full public data set, for the few tests that check facts of the whole set: ``file`` of data
    set ``name`` in the ``mlip-uq data fetch`` cache (:func:`mlip_uq.datasets.cache_dir`), else
    ``$MLIP_UQ_SHARED_DATA/<shared>`` where that variable is set (``.ci/run`` sets it when a copy of the data sets
    lies beside the checkout); the test is skipped, naming the fetch command, when neither holds it."""
    from mlip_uq.datasets import cache_dir

    cached = cache_dir() / name / file
    if cached.is_file():
        return cached
    root = os.environ.get("MLIP_UQ_SHARED_DATA")
    if root and (Path(root) / shared).is_file():
        return Path(root) / shared
    pytest.skip(f"the full data set {name} is not on this machine (fetch it with `mlip-uq data fetch {name}`)")


@pytest.fixture
def fake_data_cache(tmp_path, monkeypatch) -> Path:
    """``$MLIP_UQ_DATA`` set to a fresh folder holding an empty placeholder of every file of every registered
    data set, so that configurations naming ``dataset:NAME/FILE`` load (their data files are not read)."""
    from mlip_uq.datasets import REGISTRY

    cache = tmp_path / "data_cache"
    for name, spec in REGISTRY.items():
        for file in spec.files:
            (cache / name / file).parent.mkdir(parents=True, exist_ok=True)
            (cache / name / file).touch()
    monkeypatch.setenv("MLIP_UQ_DATA", str(cache))
    return cache


@pytest.fixture(scope="session")
def tio2_path() -> Path:
    """The bundled 1,000-structure aenet TiO2 subset (MIT, shipped in data/)."""
    return BUNDLED_TIO2


@pytest.fixture(scope="session")
def tio2_store(tmp_path_factory) -> Path:
    """One data store (frames and neighbour lists of the bundled TiO2 subset at the tiny model's ``r_max``) for
    every tiny TiO2 run of the session: set it as ``data.store``."""
    return tmp_path_factory.mktemp("tio2_store") / "data.h5"


def tiny_tio2_config(tio2_path: Path, n_train: int, n_eval: int, store: Path | None = None, **sections) -> dict:
    """A run configuration on a few structures of the bundled TiO2 subset with a very small model; ``store``
    (the session's :func:`tio2_store`) is its ``data.store`` if given (else the run's own ``data.h5``);
    ``sections`` (``method``, ``training``, ``sgmcmc``, ...) are added as given."""
    config = {
        "name": "tiny",
        "seed": 0,
        "data": {
            "path": str(tio2_path),
            "energy_references": {"O": -432.503149303, "Ti": -1604.604515075},
            "filter": {"max_energy_per_atom": -5.0, "max_force": 20.0},
            "split": {"kind": "random", "val_fraction": 0.1, "test_fraction": 0.1},
            "n_train": n_train, "n_val": n_eval, "n_test": n_eval,
        },
        "model": {"r_max": 4.0, "num_layers": 2, "l_max": 1, "num_features": 8, "radial_mlp_width": 16},
        **sections,
    }
    if store is not None:
        config["data"]["store"] = str(store)
    return config


#: the smallest model the tests train or predict with (override per test)
TINY_MODEL = {"r_max": 3.5, "num_layers": 1, "l_max": 1, "num_features": 4, "radial_mlp_width": 8}


def tiny_model_config(type_names, **overrides) -> ModelConfig:
    """A :data:`TINY_MODEL` architecture for ``type_names``, with ``overrides`` (any ModelConfig option)."""
    return ModelConfig(type_names=list(type_names), **{**TINY_MODEL, **overrides})


_UNTRAINED_STATES: dict = {}


def untrained_state_dict(config: ModelConfig, seed: int) -> dict:
    """The state dict of ``build_model(config)`` initialised from ``seed`` (a copy: the caller may change it).

    Building a nequip model takes ~0.3 s (e3nn generates the code of its tensor products), and the unit tests ask
    for the same few architectures and seeds hundreds of times: each is built once per session (the build is
    deterministic in its configuration and seed)."""
    values = {**config.to_dict(), "seed": int(seed)}
    key = json.dumps(values, sort_keys=True)
    if key not in _UNTRAINED_STATES:
        _UNTRAINED_STATES[key] = build_model(ModelConfig.from_dict(values)).state_dict()
    return {name: tensor.clone() for name, tensor in _UNTRAINED_STATES[key].items()}


def seeded_posterior(config: ModelConfig, seeds=(0, 1, 2), **kwargs) -> Posterior:
    """A posterior of untrained members of ``config``, one per seed (``kwargs``: method, metadata, ...)."""
    return Posterior.from_state_dicts(config, [untrained_state_dict(config, s) for s in seeds], **kwargs)


def run_and_kill(args, log: Path, rows: int, timeout_s: float = 300.0) -> None:
    """Run ``python -m mlip_uq.cli *args`` in a subprocess (this checkout, one thread) and SIGKILL it once the file
    ``log`` holds more than ``rows`` lines; fails if the run ends before that."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlip_uq.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) > rows:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
