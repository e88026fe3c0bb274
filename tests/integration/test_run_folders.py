"""Run folders (issue 17): a failed or refused re-run leaves a finished run as it was, logs survive a kill and a
resume appends exactly the missing rows, and a pickled checkpoint is refused by name."""

import shutil

import pytest

from conftest import tiny_tio2_config

from mlip_uq.cli import main
from mlip_uq.config import ConfigError
from mlip_uq.posterior import load_posterior
from mlip_uq.train import train

SGMCMC = {"lr": 2e-4, "batch_size": 8, "burnin_steps": 10, "preheat_steps": 2, "n_samples": 3, "thinning": 2,
          "n_chains": 2, "checkpoint_every": 5, "trace_every": 1, "noise": {"energy": 0.02, "forces": 0.2}}


def map_config(tio2_path, **training):
    return tiny_tio2_config(tio2_path, 16, 4, training={"max_epochs": 2, "batch_size": 8, **training})


def sgmcmc_config(tio2_path, **sgmcmc):
    return tiny_tio2_config(tio2_path, 16, 4, method="sgmcmc", sgmcmc={**SGMCMC, **sgmcmc})


@pytest.fixture(scope="module")
def finished_runs(tio2_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    return {"map": train(map_config(tio2_path), out_dir=root / "map"),
            "sgmcmc": train(sgmcmc_config(tio2_path), out_dir=root / "sgmcmc")}


def snapshot(folder):
    """Every file of a folder and its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def copied(finished_runs, tmp_path):
    def copy(method):
        shutil.copytree(finished_runs[method], tmp_path / method)
        return tmp_path / method
    return copy


@pytest.mark.parametrize("method", ["map", "sgmcmc"])
def test_a_re_run_into_a_finished_folder_is_refused_and_changes_nothing(tio2_path, copied, method):
    out = copied(method)
    before = snapshot(out)
    config = map_config(tio2_path) if method == "map" else sgmcmc_config(tio2_path)
    with pytest.raises(ConfigError, match="already holds a run .*--resume .*--overwrite"):
        train(config, out_dir=out)
    with pytest.raises(ConfigError, match="give one"):
        train(config, out_dir=out, resume=True, overwrite=True)
    assert snapshot(out) == before
    if method == "sgmcmc":  # the K = 6 posterior and its chain files are still there
        assert load_posterior(out / "posterior.h5").n_samples == 6
        assert len(list((out / "sgmcmc").glob("samples_chain*.h5"))) == 2


@pytest.mark.parametrize("change", [
    {"data": {"path": "missing.extxyz"}},  # bad data
    {"training": {"max_epochs": "ten"}},  # bad setting
    {"model": {"num_features": "four"}},
    {"data": {"split": {"kind": "voronoi"}}},  # found while the data are prepared
])
def test_a_failed_overwrite_leaves_the_run_resumable(tio2_path, copied, change):
    out = copied("map")
    before = snapshot(out)
    config = map_config(tio2_path)
    for section, values in change.items():
        config[section] = {**config[section], **values}
    with pytest.raises((ValueError, FileNotFoundError)):
        train(config, out_dir=out, overwrite=True)
    assert snapshot(out) == before
    train(map_config(tio2_path), out_dir=out, resume=True)  # the configuration it started with is accepted
    assert load_posterior(out / "posterior.h5").n_samples == 1


def test_cli_names_the_folder_rule(tio2_path, copied, tmp_path, capsys):
    import yaml

    out = copied("map")
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(map_config(tio2_path)))
    assert main(["train", str(path), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(path), "--out", str(out), "--overwrite", "training.max_epochs=1"]) == 0
    assert "max_epochs: 1" in (out / "config.yaml").read_text()
