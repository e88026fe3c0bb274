"""Every shipped configuration (configs/*.yaml) loads and its settings parse, without training; a wrong type in
any section of one is named by the one loader, with its key; a configuration that names a data set the cache
does not hold fails with the command that fetches it."""

import copy
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from mlip_uq.active.config import ActiveConfig, load_active_config
from mlip_uq.cli import main
from mlip_uq.compare import load_compare_config, run_config
from mlip_uq.config import (
    BASE_SECTIONS,
    ConfigError,
    RunConfig,
    check_resumed_config,
    dump_config,
    load_config,
    read_config_file,
)
from mlip_uq.datasets import DatasetNotFetchedError
from mlip_uq.inference import METHODS

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def kind(path: Path) -> str:
    raw, _ = read_config_file(path)
    return "compare" if "compare" in raw else "active" if "oracle" in raw else "train"


def test_the_repository_ships_configurations_of_every_kind():
    assert len(CONFIGS) >= 19 and {kind(p) for p in CONFIGS} == {"train", "active", "compare"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configuration_loads_and_its_settings_parse(path, fake_data_cache, tmp_path):
    """Training configurations: ``load_config`` (every section, the method's ``Settings`` included: what ``mlip-uq
    train`` checks before it reads data); active-learning ones: the loader (the rule, the training configuration of
    the loop's posterior with its method settings, the ``update`` section); comparisons: every run of every
    budget."""
    what = kind(path)
    if what == "train":
        config = load_config(path)
        assert isinstance(config, RunConfig) and config.settings is not None
        for key in (config.data.path, config.data.test_path):
            assert key is None or Path(key).is_absolute()
    elif what == "active":
        cfg = load_active_config(path)
        assert isinstance(cfg, ActiveConfig) and cfg.rule.build(cfg.seed).kind == cfg.rule.kind
        assert cfg.train_config(tmp_path).data.path == str(tmp_path / "initial.extxyz")
        assert Path(cfg.initial.path).is_absolute()
    else:
        raw, _ = read_config_file(path)
        for budget in [None, *raw["compare"].get("budgets", {})]:
            study = load_compare_config(path, budget=budget)
            for regime in study["regimes"]:
                for split in study["splits"]:
                    for method in study["methods"]:
                        load_config(run_config(study, regime, split, method))


def _first_leaf(section, key):
    """The dotted key and value of the first option (depth first) of a section; a list counts as one option."""
    if not isinstance(section, dict) or not section:
        return key, section
    name, value = next(iter(section.items()))
    return _first_leaf(value, f"{key}.{name}")


def _wrong(value):
    """A value of another type than ``value``'s (a string where a number, flag or list is expected, a number
    where a string is)."""
    return 12345 if isinstance(value, str) else "wrong"


def _with_wrong_type(raw: dict, section: str):
    """``raw`` with the first option of ``section`` given a wrong type, and that option's dotted key."""
    broken = copy.deepcopy(raw)
    dotted, value = _first_leaf(broken[section], section)
    *parents, last = dotted.split(".")
    node = broken
    for part in parents:
        node = node[part]
    node[last] = _wrong(value)
    return broken, dotted


def _cases():
    """(configuration, section) for every section of every shipped training and active-learning configuration
    that its loader reads (a training configuration's sections of its method and the base ones)."""
    for path in CONFIGS:
        raw, _ = read_config_file(path)
        what = kind(path)
        if what == "train":
            read = set(BASE_SECTIONS) | set(METHODS[raw.get("method", "map")].sections)
            yield from ((path, s) for s in raw if s in read)
        elif what == "active":
            yield from ((path, s) for s in raw)
            yield from ((path, f"train.{s}") for s in raw["train"] if s != "method")


@pytest.mark.parametrize("path, section", list(_cases()), ids=lambda v: v.stem if isinstance(v, Path) else v)
def test_a_wrong_type_in_any_section_is_named_by_the_loader(path, section, fake_data_cache, monkeypatch):
    """One place validates settings: a value of the wrong type in any section of a shipped configuration is a
    :class:`~mlip_uq.settings.ConfigError` of ``load_config`` / ``load_active_config`` that names its key (a key
    of the loop's training configuration as ``train: key``)."""
    raw, _ = read_config_file(path)
    if section.startswith("train."):
        train, dotted = _with_wrong_type(raw["train"], section.split(".", 1)[1])
        broken, dotted = {**raw, "train": train}, f"train.{dotted}"
    else:
        broken, dotted = _with_wrong_type(raw, section)
    monkeypatch.chdir(path.parent)  # a mapping's relative paths are the working directory's
    load = load_config if kind(path) == "train" else load_active_config
    with pytest.raises(ConfigError) as error:
        load(broken)
    named = (dotted, dotted.replace("train.", "train: ", 1))
    assert any(re.search(rf"(^|[^\w.]){re.escape(key)}\b", str(error.value)) for key in named), str(error.value)


def test_configurations_name_their_public_data_sets_in_the_cache(fake_data_cache):
    """The data sets the configurations train on are found in the ``mlip-uq data fetch`` cache."""
    assert load_config(REPO_ROOT / "configs" / "ethanol_map.yaml").data.path == str(
        fake_data_cache / "rmd17_ethanol" / "rmd17_ethanol_train_01.extxyz")
    assert load_config(REPO_ROOT / "configs" / "tio2_map.yaml").data.path == str(
        fake_data_cache / "tio2_aenet" / "tio2_aenet_7815.extxyz")
    active = load_active_config(REPO_ROOT / "configs" / "active_acac_xtb.yaml")
    assert active.initial.path == str(fake_data_cache / "botnet_acac" / "train_300K.xyz")


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


def test_a_resumed_run_matches_a_saved_configuration_that_leaves_out_defaults(fake_data_cache, tmp_path):
    """An earlier version's file (an option at its default left out) matches; a changed value is named by key."""
    config = load_active_config(REPO_ROOT / "configs" / "active_ethanol_xtb.yaml")
    saved = tmp_path / "active_config.yaml"
    raw = yaml.safe_load(dump_config(config, None))
    assert raw["explore"]["starts"].pop("n") is None  # an option an earlier version did not write
    saved.write_text(yaml.safe_dump(raw))
    check_resumed_config(saved, config, load_active_config, ["budget"], "active-learning run")
    changed = load_active_config({**config.to_dict(), "seed": config.seed + 1, "budget": {"max_calls": 99}})
    with pytest.raises(ConfigError, match=r"differs .* in seed \(only budget may change\)"):
        check_resumed_config(saved, changed, load_active_config, ["budget"], "active-learning run")
    saved.write_text(yaml.safe_dump({**raw, "rule": {**raw["rule"], "colour": "red"}}))
    with pytest.raises(ConfigError, match=r"active_config.yaml, the configuration the active-learning run started "
                                          r"with, does not load: .*colour"):
        check_resumed_config(saved, config, load_active_config, ["budget"], "active-learning run")
