"""The ``data`` section is checked when the configuration is loaded, before any file is read (issue 17)."""

import pytest

from mlip_uq.config import ConfigError, load_config
from mlip_uq.train import train


def settings(tmp_path, *overrides):
    # the data file does not exist: a check that read it would fail with another message
    return load_config({"data": {"path": str(tmp_path / "none.extxyz")}}, overrides)


@pytest.mark.parametrize("override, message", [
    ("data.n_train=ten", r"data.n_train='ten': expected an integer or null"),
    ("data.min_distnace=0.5", r"unknown data option\(s\) \['min_distnace'\]"),
    ("data.min_distance=close", r"data.min_distance='close': expected a number"),
    ("data.energy_references=isolated", r"data.energy_references='isolated': expected one of 'fit' or a mapping"),
    ("data.keys.force=F", r"unknown data.keys option\(s\) \['force'\]"),
    ("data.filter.max_forces=10", r"unknown data.filter option\(s\) \['max_forces'\]"),
    ("data.filter.max_force=big", r"data.filter.max_force='big': expected a number or null"),
    ("data.split.val_frac=0.2", r"unknown data.split option\(s\) \['val_frac'\] for kind random"),
    ("data.split.test_fraction=[0.1]", r"data.split.test_fraction=\[0.1\]: expected a number"),
    ("data.split={kind: voronoi}", r"data.split.kind='voronoi': expected one of random, property_range"),
    ("data.split={kind: cell_size}", r"data.split of kind cell_size needs max_train_atoms"),
    ("data.split={kind: random, val_fraction: 0.1}", r"data.split of kind random needs test_fraction"),
    ("data.split=random", r"data.split='random': expected a mapping"),
    ("data.split={kind: kmeans, n_clusters: 2.5}", r"data.split.n_clusters=2.5: expected an integer"),
    ("model.num_features=four", r"model.num_features='four': expected an integer"),
    ("model.energy_shifts=isolated", r"model.energy_shifts='isolated': expected one of 'fit', 'references' or a"),
    ("model.dtype=float16", r"model: dtype must be 'float32' or 'float64', got 'float16'"),
    ("evaluate.batch_size=all", r"evaluate.batch_size='all': expected an integer"),
    ("seed=zero", r"seed='zero': expected an integer"),
])
def test_a_bad_data_or_model_option_is_named_at_load_time(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path, override)


def test_good_data_options_pass_and_a_bad_one_leaves_no_run_folder(tmp_path):
    cfg = settings(tmp_path, "data.split={kind: kmeans, n_clusters: 4, test_fraction: 0.2}", "data.n_train=10",
                   "data.energy_references={O: -432.5, Ti: -1604.6}")
    assert (cfg.data.split.kind, cfg.data.split.n_clusters, cfg.data.n_train) == ("kmeans", 4, 10)
    assert cfg.data.energy_references == {"O": -432.5, "Ti": -1604.6}
    with pytest.raises(ConfigError, match="data.n_val"):
        train({"data": {"path": str(tmp_path / "none.extxyz"), "n_val": "all"}}, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
