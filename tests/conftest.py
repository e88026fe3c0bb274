"""Shared test fixtures: paths to the data files the repository ships in data/ (every test runs from them
alone), small model configurations and posteriors."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported where used: the xdist controller imports neither (pytest_configure)
    from mlip_uq.model import ModelConfig
    from mlip_uq.posterior import Posterior

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_TIO2 = REPO_ROOT / "data" / "tio2_aenet_subset_1000.extxyz"
#: the first 200 frames of rMD17 ethanol's official train split 01 and the first 50 of its test split 01 (CC0,
#: shipped in data/, provenance in data/README.md)
BUNDLED_ETHANOL_TRAIN = REPO_ROOT / "data" / "rmd17_ethanol_train_01_200.extxyz"
BUNDLED_ETHANOL_TEST = REPO_ROOT / "data" / "rmd17_ethanol_test_01_50.extxyz"


def pytest_configure(config):
    """Before the tests are collected: nequip's global state (default dtype float64), under which nequip models
    are built; a pytest-xdist worker (``make test`` runs two, one per core) computes with one thread: the tiny
    models of the tests gain nothing from intra-op threads, and two workers with two threads each would
    oversubscribe the cores. The xdist controller, which only hands out the test files, does without (and
    without importing torch, nequip and the package, ~5 s before the workers start)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return
    import torch
    from nequip.utils.global_state import set_global_state

    set_global_state()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


# loading a nequip package (mlip_uq.export: each export checks every package it writes, and tests load them again)
# imports the package's own copy of nequip, whose version module scans every installed distribution at import
# (importlib.metadata.packages_distributions, ~0.5 s per package): the installed distributions do not change during
# a test session, so the scan is done once (each caller gets its own copy of the mapping)
_packages_distributions = functools.lru_cache(maxsize=1)(importlib.metadata.packages_distributions)
importlib.metadata.packages_distributions = lambda: dict(_packages_distributions())


def _bundled_frames_once(read_frames):
    """``read_frames`` that reads and validates each file of data/ once per session (per set of arguments) and
    hands out copies: every run of a test (``train``, ``evaluate``, the active-learning loop) reads the whole bundled
    file, e.g. the 1,000 TiO2 structures (~1.5 s, most of it the minimum-distance check), for a few of them. Other
    files are read every time; the tests of ``read_frames`` itself (tests/unit/test_data_frames.py) call it directly."""
    from ase.calculators.singlepoint import SinglePointCalculator

    read, bundled = {}, (REPO_ROOT / "data").resolve()

    def copy(atoms):
        new = atoms.copy()
        new.calc = SinglePointCalculator(new, **{k: v.copy() if hasattr(v, "copy") else v
                                                 for k, v in atoms.calc.results.items()})
        return new

    @functools.wraps(read_frames)
    def cached(path, *args, **kwargs):
        file = Path(path).resolve()
        if file.parent != bundled or not file.is_file():
            return read_frames(path, *args, **kwargs)
        key = (str(file), file.stat().st_mtime_ns, repr(args), repr(sorted(kwargs.items())))
        if key not in read:
            read[key] = read_frames(path, *args, **kwargs)
        return [copy(atoms) for atoms in read[key]]

    return cached


def _copy_model(model):
    """``copy.deepcopy(model)`` in a tenth of the time: the code e3nn generates for each tensor product and linear
    map (``torch.fx.GraphModule``s without parameters or buffers: pure functions of their inputs, the weights
    among them) is shared with ``model`` instead of being pickled and traced again, which is what e3nn's
    ``CodeGenMixin.__getstate__``/``__setstate__`` do on a deep copy. Every parameter and buffer is copied."""
    import copy

    import torch

    try:
        from e3nn.util.codegen._mixin import CodeGenMixin
    except ImportError:  # another e3nn layout: a plain deep copy
        return copy.deepcopy(model)
    memo = {id(m): m for m in model.modules() if isinstance(m, torch.fx.GraphModule)
            and next(m.parameters(), None) is None and next(m.buffers(), None) is None}
    pickled = CodeGenMixin.__getstate__, CodeGenMixin.__setstate__

    def plain_state(self):
        base = super(CodeGenMixin, self)
        return base.__getstate__() if hasattr(base, "__getstate__") else self.__dict__

    def plain_set_state(self, state):
        base = super(CodeGenMixin, self)
        base.__setstate__(state) if hasattr(base, "__setstate__") else self.__dict__.update(state)

    CodeGenMixin.__getstate__, CodeGenMixin.__setstate__ = plain_state, plain_set_state
    try:
        return copy.deepcopy(model, memo)
    finally:
        CodeGenMixin.__getstate__, CodeGenMixin.__setstate__ = pickled


def _built_once(builder):
    """The model builder behind :func:`mlip_uq.model.build_model` that builds each architecture and seed once per
    session and hands out copies (:func:`_copy_model`: equal in every tensor, sharing no tensor). Building a nequip
    model (~0.3 s: e3nn generates and optimises the code of its tensor products) is most of a tiny test run's
    cost, and a run builds the same model several times (training, noise fit, predictions); a copy takes ~0.01 s.
    The build is deterministic in its arguments (nequip seeds it in an isolated RNG state), so a copy is the model
    a build would give. The modules whose tests are about building (tests/unit/test_model.py: a seed gives the same
    parameters; tests/unit/test_dropout.py) build every model afresh (``FRESH_MODELS``)."""
    built = {}

    @functools.wraps(builder)
    def cached(**kwargs):
        if _FRESH_MODELS[0]:
            return builder(**kwargs)
        key = json.dumps(kwargs, sort_keys=True)
        if key not in built:
            built[key] = builder(**kwargs)
        return _copy_model(built[key])

    return cached


_FRESH_MODELS = [False]


@pytest.fixture(scope="session", autouse=True)
def _read_and_build_once():
    """For the session (in each pytest-xdist worker; not in the controller, which runs no test and so need not
    import these modules): the bundled data files read once (:func:`_bundled_frames_once`) and each model built
    once (:func:`_built_once`)."""
    readers = [importlib.import_module(name) for name in ("mlip_uq.train", "mlip_uq.evaluate", "mlip_uq.active.sources")
               if importlib.util.find_spec(name)]  # the modules that read a run's data files
    patched = [(module, "read_frames", _bundled_frames_once) for module in readers if hasattr(module, "read_frames")]
    patched.append((importlib.import_module("mlip_uq.model.build"), "_uq_nequip", _built_once))
    originals = [(module, name, getattr(module, name)) for module, name, _ in patched]
    for module, name, wrap in patched:
        setattr(module, name, wrap(getattr(module, name)))
    yield
    for module, name, original in originals:
        setattr(module, name, original)


@pytest.fixture(autouse=True)
def _fresh_models(request):
    """Build every model afresh in a test module that sets ``FRESH_MODELS = True`` (see :func:`_built_once`)."""
    _FRESH_MODELS[0] = bool(getattr(request.module, "FRESH_MODELS", False))
    yield
    _FRESH_MODELS[0] = False


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
    from mlip_uq.model import ModelConfig

    return ModelConfig(type_names=list(type_names), **{**TINY_MODEL, **overrides})


_UNTRAINED_STATES: dict = {}


def untrained_state_dict(config: ModelConfig, seed: int) -> dict:
    """The state dict of ``build_model(config)`` initialised from ``seed`` (a copy: the caller may change it).

    Building a nequip model takes ~0.3 s (e3nn generates the code of its tensor products), and the unit tests ask
    for the same few architectures and seeds hundreds of times: each is built once per session (the build is
    deterministic in its configuration and seed)."""
    from mlip_uq.model import ModelConfig, build_model

    values = {**config.to_dict(), "seed": int(seed)}
    key = json.dumps(values, sort_keys=True)
    if key not in _UNTRAINED_STATES:
        _UNTRAINED_STATES[key] = build_model(ModelConfig.from_dict(values)).state_dict()
    return {name: tensor.clone() for name, tensor in _UNTRAINED_STATES[key].items()}


def seeded_posterior(config: ModelConfig, seeds=(0, 1, 2), **kwargs) -> Posterior:
    """A posterior of untrained members of ``config``, one per seed (``kwargs``: method, metadata, ...)."""
    from mlip_uq.posterior import Posterior

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
