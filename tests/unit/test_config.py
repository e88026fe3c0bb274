"""Run configurations: defaults, overrides, path resolution and errors; the typed configuration they load into."""

import dataclasses
from pathlib import Path

import pytest

from mlip_uq.config import ConfigError, DataConfig, EvaluateOptions, RunConfig, load_config
from mlip_uq.data.splits import CellSizeSplit, RandomSplit
from mlip_uq.model import ModelConfig


def write(tmp_path, text):
    path = tmp_path / "configs" / "run.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_overrides_and_numbers_in_scientific_notation(tmp_path):
    path = write(tmp_path, "data: {path: ../d.extxyz}\nsgmcmc: {lr: 1e-4, init: map}\n")
    cfg = load_config(path, ["training.lr=5e-4", "sgmcmc.stochastic={last_layers: 2}", "data.n_train=50"])
    assert isinstance(cfg, RunConfig) and cfg.method == "map" and cfg.data.split == RandomSplit(0.1, 0.1)
    assert cfg.settings.training.lr == 5e-4 and cfg.data.n_train == 50
    sgmcmc = load_config(cfg, ["method=sgmcmc"])  # a loaded configuration, changed and checked again
    assert sgmcmc.settings.lr == 1e-4 and sgmcmc.settings.training.lr == 5e-4
    assert sgmcmc.settings.stochastic == {"last_layers": 2}
    assert cfg.to_dict()["sgmcmc"] == {"lr": 1e-4, "init": "map", "stochastic": {"last_layers": 2}}


def test_the_typed_configuration_is_frozen_and_changed_by_loading_it_again(tmp_path):
    cfg = load_config({"data": {"path": str(tmp_path / "d.extxyz"), "split": {"kind": "cell_size",
                                                                           "max_train_atoms": 30}}})
    assert cfg.data.split == CellSizeSplit(max_train_atoms=30) and cfg.model.type_names is None
    assert cfg.model.config.seed == cfg.seed == 0 and cfg.run_name == "map"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    other = cfg.with_values({"seed": 3, "model.type_names": ["H", "O"], "data.store": "store.h5"})
    assert other.seed == 3 and other.model.config.seed == 3 and other.model.type_names == ["H", "O"]
    assert other.data.store == str(Path.cwd() / "store.h5") and cfg.data.store is None
    assert "type_names" not in other.model.from_data and "energy_scale" in other.model.from_data


def test_relative_paths_are_resolved_against_the_config_file(tmp_path):
    path = write(tmp_path, "method: sgmcmc\ndata: {path: ../d.extxyz, test_path: t.xyz}\n"
                           "sgmcmc: {init: ../runs/a/posterior.h5, prior: {center: ../runs/a/posterior.h5}}\n")
    cfg = load_config(path)
    assert cfg.data.path == str(tmp_path / "d.extxyz")
    assert cfg.data.test_path == str(tmp_path / "configs" / "t.xyz")
    assert cfg.data.split.test_fraction == 0.0  # a test file: no test part
    assert cfg.settings.init == cfg.settings.prior.center == str(tmp_path / "runs" / "a" / "posterior.h5")


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("data: {path: a}\nmodle: {}\n", [], r"unknown configuration section\(s\) \['modle'\]"),
        ("data: {path: a}\n", ["training.lr"], "not of the form key=value"),
        ("data: {path: a}\n", ["traning.lr=1"], "unknown section 'traning'"),
        ("method: bayes\ndata: {path: a}\n", [], "method 'bayes' is not available"),
        ("model: {}\n", [], "data.path is required"),
        ("- a\n- b\n", [], "must hold a mapping"),
        ("data: {path: [\n", [], "not valid YAML"),
    ],
)
def test_bad_configurations_are_named(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_the_recorded_defaults_are_the_typed_sections_defaults():
    """``config.yaml`` records the defaults of :data:`BASE_DEFAULTS`; they are the dataclasses' own."""
    cfg = load_config({"data": {"path": "/d.extxyz"}})
    assert cfg.data == DataConfig(path="/d.extxyz", split=RandomSplit(val_fraction=0.1, test_fraction=0.1))
    assert cfg.evaluate == EvaluateOptions() and cfg.model.config == ModelConfig(type_names=[])
