"""Run configurations: defaults, overrides, path resolution and errors."""

import pytest

from mlip_uq.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "configs" / "run.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_overrides_and_numbers_in_scientific_notation(tmp_path):
    path = write(tmp_path, "data: {path: ../d.extxyz}\nsgmcmc: {lr: 1e-4}\n")
    cfg = load_config(path, ["training.lr=5e-4", "sgmcmc.stochastic={last_layers: 2}", "data.n_train=50"])
    assert cfg["sgmcmc"]["lr"] == 1e-4 and cfg["training"]["lr"] == 5e-4
    assert cfg["sgmcmc"]["stochastic"] == {"last_layers": 2} and cfg["data"]["n_train"] == 50
    assert cfg["method"] == "map" and cfg["data"]["split"]["kind"] == "random"


def test_relative_paths_are_resolved_against_the_config_file(tmp_path):
    path = write(tmp_path, "method: sgmcmc\ndata: {path: ../d.extxyz, test_path: t.xyz}\n"
                           "sgmcmc: {init: ../runs/a/posterior.h5, prior: {center: ../runs/a/posterior.h5}}\n")
    cfg = load_config(path)
    assert cfg["data"]["path"] == str(tmp_path / "d.extxyz")
    assert cfg["data"]["test_path"] == str(tmp_path / "configs" / "t.xyz")
    assert cfg["sgmcmc"]["init"] == cfg["sgmcmc"]["prior"]["center"] == str(tmp_path / "runs" / "a" / "posterior.h5")


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
