"""The method protocol: methods written here, registered from outside the package, train through ``mlip-uq
train``, predict and are compared by ``mlip-uq compare``; ``init`` means one thing in every method; typed
settings name the offending key, its value and the expected type."""

import json
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import numpy as np
import pytest
import torch
import yaml
from conftest import BUNDLED_ETHANOL_TRAIN, TINY_MODEL, tiny_tio2_config

from mlip_uq.cli import main
from mlip_uq.config import ConfigError, load_config, settings_from
from mlip_uq.data import FrameStore
from mlip_uq.evaluate import metrics_and_plots, predict_graphs
from mlip_uq.files import atomic_write, load_checkpoint
from mlip_uq.inference import (
    METHODS,
    Artifacts,
    FitContext,
    MapStart,
    MethodModule,
    UpdatableMethod,
    is_updatable,
    load_method,
    method_sections,
    register_method,
    trains_map_alike,
)
from mlip_uq.inference.common import fit_map_once, save_checkpoint
from mlip_uq.inference.trainer import MAPSettings, training_curves
from mlip_uq.model import ModelConfig, build_model
from mlip_uq.posterior import Posterior, load_posterior

READOUT = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"


@dataclass
class Settings:
    """The toy method: K copies of the initial model, the readout weight shifted by k · ``shift``."""

    n_samples: int = 3
    shift: float = 0.01
    reference: Optional[str] = None

    PATHS: ClassVar[Tuple[str, ...]] = ("toy.reference",)

    @classmethod
    def from_dict(cls, config: Dict) -> "Settings":
        return settings_from(cls, config.get("toy"), "toy")


def fit(context: FitContext[Settings]) -> Posterior:
    state = build_model(context.model_config).state_dict()
    readout = state.pop(READOUT)
    steps = context.settings.shift * torch.arange(context.settings.n_samples, dtype=readout.dtype)
    samples = {READOUT: readout + steps[:, None, None]}
    posterior = Posterior(context.model_config, state, samples, method="toy",
                          hyperparameters=asdict(context.settings), **context.metadata)
    posterior.save(context.posterior_path)
    return posterior


def artifacts(out_dir: Path) -> Artifacts:
    return Artifacts(Path(out_dir) / "posterior.h5")  # no MAP fit, no curve


def map_start(config: Mapping[str, Any], map_config: Mapping[str, Any]) -> Optional[MapStart]:
    return None


@pytest.fixture
def toy_method():
    register_method("toy", __name__, ("toy",))  # this module, imported by its path on first use
    yield
    del METHODS["toy"]


def test_a_method_is_one_module_and_one_table_entry(toy_method, tio2_path, tio2_store, tmp_path, capsys):
    cfg = tiny_tio2_config(tio2_path, 16, 4, method="toy", toy={"n_samples": 4, "reference": "ref.h5"})
    cfg["data"]["store"] = str(tio2_store)
    path = tmp_path / "configs" / "toy.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "toy.shift=0.5"]) == 0
    post = load_posterior(tmp_path / "run" / "posterior.h5")
    assert post.method == "toy" and post.n_samples == 4
    assert post.hyperparameters == {"n_samples": 4, "shift": 0.5, "reference": str(tmp_path / "configs" / "ref.h5")}
    torch.testing.assert_close(post.samples[READOUT][3] - post.samples[READOUT][0],
                               torch.full_like(post.samples[READOUT][0], 1.5))
    assert (tmp_path / "run" / "metrics.json").is_file() and "forces MAE" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["toy"]["reference"] == str(tmp_path / "configs" / "ref.h5")  # a declared path, resolved


def test_without_its_table_entry_the_section_is_unknown(tmp_path):
    assert "toy" not in method_sections()
    with pytest.raises(ConfigError, match=r"unknown configuration section\(s\) \['toy'\]"):
        load_config({"data": {"path": "a"}, "toy": {}})


@pytest.mark.parametrize("method, section, message", [
    ("map", {"training": {"max_epochs": "ten"}}, "training.max_epochs='ten': expected an integer"),
    ("map", {"training": {"patience": 2.5}}, "training.patience=2.5: expected an integer"),
    ("map", {"training": {"loss_weights": 3}}, "training.loss_weights=3: expected a mapping"),
    ("map", {"training": {"loss_weights": {"forces": "high"}}},
     "training.loss_weights.forces='high': expected a number"),
    ("map", {"training": {"max_time_minutes": "1h"}}, "training.max_time_minutes='1h': expected a number or null"),
    ("map", {"training": {"max_epochs": True}}, "training.max_epochs=True: expected an integer"),
    ("sgmcmc", {"sgmcmc": {"lr": "fast"}}, "sgmcmc.lr='fast': expected a number"),
    ("sgmcmc", {"sgmcmc": {"n_chains": 1.5}}, "sgmcmc.n_chains=1.5: expected an integer"),
    ("sgmcmc", {"sgmcmc": {"noise": {"forces": 0.1}}}, "sgmcmc.noise: the observation noise is part of the model"),
    ("sgmcmc", {"sgmcmc": {"prior": 1.0}}, "sgmcmc.prior=1.0: expected a mapping"),
    ("sgmcmc", {"sgmcmc": {"stochastic": {"last_layers": "two"}}},
     "sgmcmc.stochastic.last_layers='two': expected an integer"),
    ("sgmcmc", {"sgmcmc": {"stochastic": "some"}}, "sgmcmc.stochastic='some': expected 'all'"),
    ("vi", {"vi": {"init": 5}}, "vi.init=5: expected a string or null"),
    ("ensemble", {"ensemble": {"bootstrap": "no"}}, "ensemble.bootstrap='no': expected true or false"),
    ("dropout", {"dropout": {"n_samples": "20"}, "model": {"dropout": 0.1}},
     "dropout.n_samples='20': expected an integer"),
    ("map", {"model": {"num_layerz": 2}}, r"unknown model option\(s\) \['num_layerz'\]"),
])
def test_mistyped_options_name_key_value_and_expected_type(method, section, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"data": {"path": "/data.extxyz"}, "method": method, **section})


class Committee:
    """Method ``committee``, written here against the protocol: ``committee.n_members`` models trained by the
    package's MAP trainer from seeds ``seed + k`` in ``fits/<k>/``, pooled into one posterior of equal weights.
    Fit 0 is a MAP run's model when the MAP fits are trained alike, so a finished MAP run is planted as it."""

    @dataclass
    class Settings:
        n_members: int = 2
        training: MAPSettings = field(default_factory=MAPSettings)

        PATHS: ClassVar[Tuple[str, ...]] = ()

        @classmethod
        def from_dict(cls, config: Dict) -> "Committee.Settings":
            training = MAPSettings.from_dict(config.get("training"))
            return settings_from(cls, {**(config.get("committee") or {}), "training": training}, "committee")

    @staticmethod
    def fit(context: FitContext["Committee.Settings"]) -> Posterior:
        config, settings = context.model_config, context.settings
        states = [fit_map_once(build_model(ModelConfig.from_dict({**config.to_dict(), "seed": config.seed + k})),
                               context.train, context.val, settings.training, context.out_dir / "fits" / str(k),
                               seed=config.seed + k, resume=context.resume) for k in range(settings.n_members)]
        posterior = Posterior.from_state_dicts(config, states, method="committee",
                                               hyperparameters={"n_members": settings.n_members}, **context.metadata)
        posterior.save(context.posterior_path)
        return posterior

    @staticmethod
    def artifacts(out_dir: Path) -> Artifacts:
        return Artifacts(Path(out_dir) / "posterior.h5", training_curves(out_dir, "fits/*"))

    @staticmethod
    def map_start(config: Mapping[str, Any], map_config: Mapping[str, Any]) -> Optional[MapStart]:
        return MapStart(plant=Committee.plant) if trains_map_alike(config, map_config) else None

    @staticmethod
    def plant(map_run: Artifacts, out_dir: Path) -> None:
        fit0 = out_dir / "fits" / "0"
        save_checkpoint(load_posterior(map_run.posterior).state_dict(0), fit0 / "final.pt")
        (fit0 / "logs").mkdir(parents=True)
        with atomic_write(fit0 / "logs" / "metrics.csv") as tmp:
            tmp.write_text(map_run.curves["."].read_text())


def test_the_protocol_is_checked_when_a_method_is_registered_or_loaded(toy_method):
    assert isinstance(Committee, MethodModule) and not isinstance(Committee, UpdatableMethod)
    assert is_updatable(load_method("sgmcmc")) and is_updatable(load_method("ensemble"))
    assert not is_updatable(load_method("vi")) and isinstance(load_method("vi"), MethodModule)
    assert isinstance(load_method("toy"), MethodModule)  # a module imported by its path
    with pytest.raises(TypeError, match="it has no artifacts, map_start"):
        register_method("partial", types.SimpleNamespace(Settings=Settings, fit=fit), ("toy",))
    with pytest.raises(ValueError, match="'map' is registered already"):
        register_method("map", Committee, ("training",))
    assert "partial" not in METHODS


@pytest.mark.parametrize("method", ["sgmcmc", "vi"])
def test_init_means_the_same_in_every_method(method):
    """``init: null`` a fresh initialisation (no MAP phase), ``init: map`` a MAP phase first with the training
    section, ``prior.center: map`` a MAP phase for the prior's centre."""
    settings = load_method(method).Settings
    fresh = settings.from_dict({"training": {"max_epochs": 3}, method: {"init": None}})
    assert not fresh.uses_map() and fresh.training is None
    for section in ({"init": "map"}, {"prior": {"center": "map"}}):
        from_map = settings.from_dict({"training": {"max_epochs": 3}, method: section})
        assert from_map.uses_map() and from_map.training.max_epochs == 3
    map_run = {"seed": 0, "data": {"path": "a"}, "training": {"max_epochs": 3}}
    start = load_method(method).map_start({**map_run, method: {"init": "map", "prior": {"center": "map"}}}, map_run)
    assert start.options == (f"{method}.init", f"{method}.prior.center") and start.plant is None
    assert load_method(method).map_start({**map_run, method: {"init": None}}, map_run) is None
    other = {**map_run, "training": {"max_epochs": 4}, method: {"init": "map"}}  # its MAP fit is another
    assert load_method(method).map_start(other, map_run) is None


@pytest.fixture(scope="module")
def committee_study(tmp_path_factory):
    """A study of the committee against method map on 20 rMD17 ethanol structures, run by ``mlip-uq compare``
    with the committee registered as an object (no file of the package changed)."""
    register_method("committee", Committee, ("committee", "training"))
    tmp = tmp_path_factory.mktemp("committee")
    study = {
        "seed": 0,
        "data": {"path": str(BUNDLED_ETHANOL_TRAIN), "n_train": 20, "n_val": 8, "n_test": 8},
        # float64: the predictions below are checked against the study's metrics at 1e-10
        "model": {**TINY_MODEL, "dtype": "float64"},
        "training": {"max_epochs": 2, "batch_size": 5, "lr": 0.01, "accelerator": "cpu"},
        "compare": {"splits": {"random": {"kind": "random", "val_fraction": 0.1, "test_fraction": 0.1}},
                    "methods": {"map": {"method": "map"},
                                "committee": {"method": "committee", "committee": {"n_members": 2}}}},
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    try:
        assert main(["compare", str(path), "--out", str(tmp / "out")]) == 0
        yield tmp / "out"
    finally:
        del METHODS["committee"]


def test_a_method_written_here_trains_predicts_and_is_compared(committee_study):
    out = committee_study / "full" / "random"
    rows = {r["method"]: r for r in json.loads((committee_study / "results.json").read_text())["runs"]}
    assert set(rows) == {"map", "committee"} and rows["committee"]["n_samples"] == 2
    assert "| committee | 2 |" in (committee_study / "results.md").read_text()
    # the committee's run asked the method: its fit 0 is the MAP run's model, planted (not trained again), and
    # its curves are those its artifacts name
    map_state = load_posterior(out / "map" / "posterior.h5").state_dict(0)
    fit0 = load_checkpoint(out / "committee" / "fits" / "0" / "final.pt")
    assert fit0.keys() == map_state.keys() and all(torch.equal(fit0[n], map_state[n]) for n in map_state)
    assert not (out / "committee" / "fits" / "0" / "checkpoints").exists()
    assert (out / "committee" / "fits" / "1" / "checkpoints").is_dir()
    assert set(rows["committee"]["plateau"]) == {"fits/0", "fits/1"}
    assert rows["committee"]["plateau"]["fits/0"] == rows["map"]["plateau"]["."]
    assert rows["committee"]["map_seconds"] == rows["map"]["train_seconds"]
    # it predicts: the posterior file of its run, on the test structures, as the study evaluated it
    posterior = load_posterior(out / "committee" / "posterior.h5")
    assert posterior.method == "committee" and posterior.n_samples == 2
    splits = json.loads((out / "committee" / "splits.json").read_text())
    graphs = FrameStore.open(committee_study / "data.h5").graphs(splits["test"], dtype=torch.float64)
    predictions = predict_graphs(posterior, graphs, 4).with_calibration({})
    assert predictions.forces_pred.shape == (9 * len(graphs), 3) and np.all(predictions.forces_std_epistemic > 0)
    metrics = metrics_and_plots(predictions)
    for key in ("energy_mae", "forces_mae", "forces_nll"):
        assert metrics[key] == pytest.approx(rows["committee"]["before"][key], rel=1e-10), key
