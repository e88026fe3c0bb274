"""Every shipped configuration (configs/*.yaml) loads and its settings parse, without training; a configuration
that names a data set the cache does not hold fails with the command that fetches it."""

from pathlib import Path

import pytest
from conftest import REPO_ROOT

from mlip_uq.active.config import load_active_config, train_config
from mlip_uq.active.rules import rule_from_config
from mlip_uq.active.update import update_options
from mlip_uq.cli import main
from mlip_uq.compare import load_compare_config, run_config
from mlip_uq.config import load_config, read_config_file
from mlip_uq.datasets import DatasetNotFetchedError
from mlip_uq.train import method_settings

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def kind(path: Path) -> str:
    raw, _ = read_config_file(path)
    return "compare" if "compare" in raw else "active" if "oracle" in raw else "train"


def test_the_repository_ships_configurations_of_every_kind():
    assert len(CONFIGS) >= 19 and {kind(p) for p in CONFIGS} == {"train", "active", "compare"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configuration_loads_and_its_settings_parse(path, fake_data_cache, tmp_path):
    """Training configurations: ``load_config`` and the method's ``Settings`` (what ``mlip-uq train`` checks
    before it reads data); active-learning ones: the loader, the rule, the training configuration of the loop's
    posterior with its method settings and the ``update`` section; comparisons: every run of every budget."""
    what = kind(path)
    if what == "train":
        config = load_config(path)
        method_settings(config)
        for key in ("path", "test_path"):
            if config["data"][key]:
                assert Path(config["data"][key]).is_absolute()
    elif what == "active":
        cfg = load_active_config(path)
        rule_from_config(cfg["rule"], seed=int(cfg["seed"]))
        train = train_config(cfg, tmp_path)
        update_options(train["method"], method_settings(train), cfg["update"])
        assert Path(cfg["initial"]["path"]).is_absolute()
    else:
        raw, _ = read_config_file(path)
        for budget in [None, *raw["compare"].get("budgets", {})]:
            study = load_compare_config(path, budget=budget)
            for regime in study["regimes"]:
                for split in study["splits"]:
                    for method in study["methods"]:
                        method_settings(load_config(run_config(study, regime, split, method)))


def test_configurations_name_their_public_data_sets_in_the_cache(fake_data_cache):
    """The data sets the configurations train on are found in the ``mlip-uq data fetch`` cache."""
    assert load_config(REPO_ROOT / "configs" / "ethanol_map.yaml")["data"]["path"] == str(
        fake_data_cache / "rmd17_ethanol" / "rmd17_ethanol_train_01.extxyz")
    assert load_config(REPO_ROOT / "configs" / "tio2_map.yaml")["data"]["path"] == str(
        fake_data_cache / "tio2_aenet" / "tio2_aenet_7815.extxyz")
    active = load_active_config(REPO_ROOT / "configs" / "active_acac_xtb.yaml")
    assert active["initial"]["path"] == str(fake_data_cache / "botnet_acac" / "train_300K.xyz")


def test_a_configuration_naming_an_absent_data_set_names_the_fetch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLIP_UQ_DATA", str(tmp_path / "empty_cache"))
    with pytest.raises(DatasetNotFetchedError, match="mlip-uq data fetch rmd17_ethanol"):
        load_config(REPO_ROOT / "configs" / "ethanol_map.yaml")
    with pytest.raises(DatasetNotFetchedError, match="mlip-uq data fetch botnet_acac"):
        load_active_config(REPO_ROOT / "configs" / "active_acac_xtb.yaml")
    out = tmp_path / "run"
    assert main(["train", str(REPO_ROOT / "configs" / "tio2_map.yaml"), "--out", str(out)]) == 2
    assert "mlip-uq data fetch tio2_aenet" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("path, message", [
    ("dataset:no_such_set/x.extxyz", "unknown data set 'no_such_set'"),
    ("dataset:rmd17_ethanol/other.extxyz", "has no file 'other.extxyz'"),
    ("dataset:rmd17_ethanol", "a data-set path is dataset:NAME/FILE"),
])
def test_a_mistyped_data_set_path_is_named(path, message, fake_data_cache):
    with pytest.raises(ValueError, match=message):
        load_config({"data": {"path": path}})
