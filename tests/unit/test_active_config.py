"""Active-learning configurations: defaults, paths, overrides, and bad input named before any work is done."""

import pytest
from conftest import BUNDLED_ETHANOL_TRAIN

from mlip_uq.active.config import ActiveConfig, BudgetOptions
from mlip_uq.active.explore import MDOptions
from mlip_uq.active.loop import ActiveLoop, load_active_config
from mlip_uq.active.rules import RuleOptions
from mlip_uq.active.sources import SourceOptions
from mlip_uq.config import ConfigError, RunConfig


def minimal(**sections):
    ethanol = str(BUNDLED_ETHANOL_TRAIN)
    cfg = {"oracle": {"calculator": "tblite"}, "initial": {"path": ethanol, "n": 3},
           "explore": {"kind": "md", "steps": 10}, "rule": {"kind": "force_std", "threshold": 0.1},
           "train": {"method": "sgmcmc", "sgmcmc": {"burnin_steps": 5}}}
    cfg.update(sections)
    return cfg


def test_shipped_configs_load_with_paths_resolved(tmp_path, fake_data_cache):
    """Paths resolved against the configuration's folder, and ``dataset:`` names to the data-set cache."""
    from conftest import REPO_ROOT

    for name in ("active_ethanol_xtb", "active_tio2_xtb"):
        cfg = load_active_config(REPO_ROOT / "configs" / f"{name}.yaml")
        assert isinstance(cfg, ActiveConfig) and cfg.name == name and cfg.kind == "md"
        for source in (cfg.initial, cfg.test, cfg.explore.starts):
            assert source.path.startswith("/") and source.path.endswith(".extxyz")


def test_defaults_and_overrides():
    cfg = load_active_config(minimal(), overrides=["budget.max_calls=7", "rule.threshold=2e-2"])
    assert cfg.budget == BudgetOptions(max_calls=7, target_forces_mae=None)
    assert cfg.rule == RuleOptions("force_std", {"threshold": 0.02})  # YAML 1.2 float
    assert cfg.explore.chunk_steps == 200 and cfg.explore.temperature_K == 300.0 and cfg.explore.uq_every == 1
    assert cfg.explore.starts == SourceOptions(path=str(BUNDLED_ETHANOL_TRAIN), index="0")  # the initial file's
    every = load_active_config(minimal(), overrides=["explore.uq_every=10"])
    assert isinstance(every.explore, MDOptions)
    assert every.explore.md_kwargs(0)["uq_every"] == 10  # what run_md is given for every chunk


def test_the_typed_configuration_carries_the_loops_training_and_update(tmp_path):
    cfg = load_active_config(minimal(update={"settle_steps": 7}))
    assert isinstance(cfg.train, RunConfig) and cfg.train.method == "sgmcmc" and cfg.train.seed == cfg.seed
    assert cfg.train.settings.burnin_steps == 5 and cfg.update.settle_steps == 7
    assert cfg.train.data.split.test_fraction == 0.0 and cfg.train.data.path == "initial.extxyz"
    train = cfg.train_config(tmp_path, ["H", "C", "O"])
    assert train.data.path == str(tmp_path / "initial.extxyz") and train.model.type_names == ["H", "C", "O"]
    assert "path" not in cfg.to_dict()["train"].get("data", {})  # recorded as given
    assert cfg.with_values({"budget.max_calls": 0, "train.sgmcmc.lr": 1e-3}).train.settings.lr == 1e-3


def test_walkers_take_turns_over_a_temperature_list():
    options = MDOptions(temperature_K=[600, 1200])
    assert [options.walker_temperature(i) for i in range(4)] == [600.0, 1200.0, 600.0, 1200.0]
    assert options.md_kwargs(3)["temperature_K"] == 1200.0
    assert MDOptions(temperature_K=450).walker_temperature(5) == 450.0


@pytest.mark.parametrize("change,message", [
    ({"oracles": {}}, "unknown active-learning section"),
    ({"rule": None}, "section 'rule' is required"),
    ({"explore": {"kind": "metadynamics"}}, "explore.kind 'metadynamics' unknown"),
    ({"explore": {"kind": "md", "stepz": 5}}, r"unknown explore option\(s\) \['stepz'\]"),
    ({"explore": {"kind": "pool", "pool": {"path": "x.xyz", "size": 5}}}, r"unknown explore.pool option\(s\)"),
    ({"budget": {"calls": 5}}, r"unknown budget option\(s\) \['calls'\]"),
    ({"explore": {"kind": "md", "steps": "many"}}, r"explore.steps='many': expected an integer"),
    ({"explore": {"kind": "md", "uq_every": 7}}, r"explore.uq_every=7: expected a positive integer that divides"),
    ({"explore": {"kind": "md", "uq_every": 0}}, r"explore.uq_every=0"),
    ({"train": {"data": {"path": "x.xyz"}}}, "train.data.path is filled in by the loop"),
    ({"train": {"sgmcmc": {"lr": "fast"}}}, r"train: sgmcmc.lr='fast': expected a number"),
    ({"train": {"method": "map"}}, r"active learning updates .* posteriors; train.method is 'map'"),
    ({"oracle": {"calculator": 5}}, r"oracle.calculator=5: expected a string"),
    ({"initial": {"path": "x.xyz", "labels": "dft"}}, r"initial.labels='dft': expected one of 'oracle', 'file'"),
    ({"test": {"n": 5}}, r"test.path is required"),
    ({"explore": {"kind": "pool", "batch": 5}}, r"explore.pool.path is required"),
    ({"budget": {"max_calls": "ten"}}, r"budget.max_calls='ten': expected an integer or null"),
    ({"rule": {"kind": "force_std", "threshold": 0.1, "relative": "yes"}}, r"rule.relative='yes': expected true"),
    ({"explore": {"kind": "md", "temperature_K": [600, -1]}}, r"explore.temperature_K=\[600, -1\]: expected a posi"),
    ({"explore": {"kind": "md", "temperature_K": "hot"}}, r"explore.temperature_K='hot'"),
])
def test_bad_configuration_is_named(change, message):
    with pytest.raises(ConfigError, match=message):
        load_active_config(minimal(**change))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_active_config(minimal(), overrides=["budget.max_calls"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_active_config(tmp_path / "nope.yaml")


def test_rules_that_do_not_fit_the_explorer_are_refused_before_any_call(tmp_path):
    with pytest.raises(ConfigError, match="top_k ranks a candidate pool"):
        ActiveLoop(load_active_config(minimal(rule={"kind": "top_k"})), tmp_path / "a")
    with pytest.raises(ConfigError, match="needs rule.probability"):
        ActiveLoop(load_active_config(minimal(rule={"kind": "random"})), tmp_path / "b")
    with pytest.raises(ConfigError, match="no structure selected"):
        ActiveLoop(load_active_config(minimal(initial={
            "path": minimal()["initial"]["path"], "max_atoms": 3})), tmp_path / "c")


@pytest.mark.parametrize("change, message", [
    ({"update": {"stepz": 10}}, r"stepz"),
    ({"update": {"settle_steps": "ten"}}, r"update.settle_steps='ten': expected an integer"),
    ({"rule": {"kind": "force_std", "treshold": 0.1}}, r"treshold"),
    ({"rule": {"kind": "force_std", "threshold": "high"}}, r"threshold"),
    ({"rule": {"kind": "calibrated"}}, r"tolerance"),
])
def test_bad_update_and_rule_settings_are_named_before_any_reference_call(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        ActiveLoop(load_active_config(minimal(**change)), tmp_path / "run")
    assert not any((tmp_path / "run").glob("*.h5"))  # nothing labelled, no store written


def test_resume_needs_a_run_and_the_same_configuration(tmp_path):
    cfg = load_active_config(minimal())
    with pytest.raises(FileNotFoundError, match="holds no active-learning run"):
        ActiveLoop(cfg, tmp_path, resume=True)
    ActiveLoop(cfg, tmp_path)  # writes active_config.yaml (no state yet: nothing ran)
    ActiveLoop(load_active_config(minimal(budget={"max_calls": 50})), tmp_path, resume=True)
    with pytest.raises(ConfigError, match="only the budget may change"):
        ActiveLoop(load_active_config(minimal(rule={"kind": "force_std", "threshold": 0.2})), tmp_path,
                   resume=True)
