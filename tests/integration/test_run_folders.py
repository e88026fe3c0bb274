"""Run folders (issue 17): a failed or refused re-run leaves a finished run as it was, logs survive a kill and a
resume appends exactly the missing rows, and a pickled checkpoint is refused by name."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_and_kill, tiny_tio2_config

from mlip_uq.cli import main
from mlip_uq.config import ConfigError
from mlip_uq.posterior import load_posterior
from mlip_uq.train import train

SGMCMC = {"lr": 2e-4, "batch_size": 8, "burnin_steps": 10, "preheat_steps": 2, "n_samples": 3, "thinning": 2,
          "n_chains": 2, "checkpoint_every": 5, "trace_every": 1}


def map_config(tio2_path, store, **training):
    return tiny_tio2_config(tio2_path, 16, 4, store, training={"max_epochs": 2, "batch_size": 8, **training})


def sgmcmc_config(tio2_path, store, **sgmcmc):
    return tiny_tio2_config(tio2_path, 16, 4, store, method="sgmcmc", sgmcmc={**SGMCMC, **sgmcmc})


@pytest.fixture(scope="module")
def finished_runs(tio2_path, tio2_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    return {"map": train(map_config(tio2_path, tio2_store), out_dir=root / "map"),
            "sgmcmc": train(sgmcmc_config(tio2_path, tio2_store), out_dir=root / "sgmcmc")}


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
def test_a_re_run_into_a_finished_folder_is_refused_and_changes_nothing(tio2_path, tio2_store, copied, method):
    out = copied(method)
    before = snapshot(out)
    config = map_config(tio2_path, tio2_store) if method == "map" else sgmcmc_config(tio2_path, tio2_store)
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
def test_a_failed_overwrite_leaves_the_run_resumable(tio2_path, tio2_store, copied, change):
    out = copied("map")
    before = snapshot(out)
    config = map_config(tio2_path, tio2_store)
    for section, values in change.items():
        config[section] = {**config[section], **values}
    with pytest.raises((ValueError, FileNotFoundError)):
        train(config, out_dir=out, overwrite=True)
    assert snapshot(out) == before
    train(map_config(tio2_path, tio2_store), out_dir=out, resume=True)  # the configuration it started with is accepted
    assert load_posterior(out / "posterior.h5").n_samples == 1


def test_cli_names_the_folder_rule(tio2_path, tio2_store, copied, tmp_path, capsys):
    out = copied("map")
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(map_config(tio2_path, tio2_store)))
    assert main(["train", str(path), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(path), "--out", str(out), "--overwrite", "training.max_epochs=1"]) == 0
    assert "max_epochs: 1" in (out / "config.yaml").read_text()


def killed_train(config: dict, out: Path, log: Path, rows: int) -> None:
    """Run ``mlip-uq train`` on ``config`` in a subprocess and SIGKILL it once ``log`` holds ``rows`` rows."""
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run_and_kill(["train", path, "--out", out], log, rows)


def test_a_killed_map_training_resumes_with_every_epoch_logged_once(tio2_path, tio2_store, tmp_path):
    config = map_config(tio2_path, tio2_store, max_epochs=20, patience=100, lr_patience=100, checkpoint_seconds=0)
    out, log = tmp_path / "run", tmp_path / "run" / "logs" / "metrics.csv"
    killed_train(config, out, log, rows=3)
    on_disk = list(csv.DictReader(open(log)))
    checkpointed = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    # every epoch logged is checkpointed, but for one a kill may cut between its row and its checkpoint
    assert len(on_disk) >= 3 and int(on_disk[-1]["epoch"]) - checkpointed in (0, 1)
    kept = [line for line in log.read_text().splitlines() if not line[0].isdigit() or int(line.split(",")[0]) <= checkpointed]
    train(config, out_dir=out, resume=True)
    rows = list(csv.DictReader(open(log)))
    assert [int(r["epoch"]) for r in rows] == list(range(20))  # each epoch once, in order: none repeated
    assert log.read_text().splitlines()[:len(kept)] == kept  # the rows before the checkpoint as they were
    assert [int(r["step"]) for r in rows] == [2 * (e + 1) for e in range(20)]  # 16 structures, batches of 8
    assert all(float(r["val_loss"]) > 0 and float(r["train_loss"]) > 0 for r in rows)


def test_a_killed_sgmcmc_run_resumes_with_every_trace_row_once(tio2_path, tio2_store, tmp_path):
    config = sgmcmc_config(tio2_path, tio2_store, n_chains=1, burnin_steps=30, n_samples=4, thinning=5,
                           checkpoint_every=7)
    reference = train(config, out_dir=tmp_path / "straight") / "sgmcmc" / "trace_chain0.csv"
    out = tmp_path / "killed"
    log = out / "sgmcmc" / "trace_chain0.csv"
    killed_train(config, out, log, rows=20)
    checkpointed = torch.load(out / "sgmcmc" / "chain0.ckpt", weights_only=True)["step"]
    assert 0 < checkpointed < 52
    before = log.read_text().splitlines()
    train(config, out_dir=out, resume=True)
    rows = list(csv.DictReader(open(log)))
    assert [int(r["step"]) for r in rows] == list(range(52))  # 30 burn-in, 2 pre-heat, 4 x 5 sampling steps
    # the rows up to the checkpoint are the killed process's own lines, untouched (header + steps < checkpointed)
    assert log.read_text().splitlines()[:1 + checkpointed] == before[:1 + checkpointed]
    # and the resumed chain repeats the uninterrupted one's steps; the killed run was another process (float32
    # model, its own intra-op threads), so its numbers agree to rounding, not bit for bit
    expected = list(csv.DictReader(open(reference)))
    assert [r["phase"] for r in rows] == [r["phase"] for r in expected]
    for key in rows[0]:
        if key not in ("step", "phase"):
            np.testing.assert_allclose([float(r[key]) for r in rows], [float(r[key]) for r in expected], rtol=1e-4,
                                       err_msg=key)
    assert load_posterior(out / "posterior.h5").n_samples == 4


def pickled(path: Path) -> Path:
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module: torch.load(weights_only=True) refuses it
    return path


@pytest.mark.parametrize("method, section", [("sgmcmc", {"init": None}), ("sgmcmc", {"prior": {"center": None}}),
                                             ("vi", {"init": None})])
def test_a_pickled_checkpoint_as_a_starting_point_or_prior_centre_is_refused_by_name(tio2_path, tio2_store, tmp_path,
                                                                                      method, section):
    path = str(pickled(tmp_path / "model.ckpt"))
    values = {k: (path if v is None else {"center": path}) for k, v in section.items()}
    config = sgmcmc_config(tio2_path, tio2_store, **values)
    if method == "vi":
        config = tiny_tio2_config(tio2_path, 16, 4, tio2_store, method="vi", vi={"steps": 5, **values})
    with pytest.raises(ValueError, match=r"model\.ckpt cannot be loaded safely"):
        train(config, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "posterior.h5").exists()


@pytest.mark.parametrize("method, checkpoint", [("map", "checkpoints/last.ckpt"), ("sgmcmc", "sgmcmc/chain0.ckpt")])
def test_a_planted_pickled_checkpoint_stops_a_resume_by_name(tio2_path, tio2_store, copied, method, checkpoint):
    out = copied(method)
    pickled(out / checkpoint)
    config = map_config(tio2_path, tio2_store) if method == "map" else sgmcmc_config(tio2_path, tio2_store)
    with pytest.raises(ValueError, match=f"{Path(checkpoint).name} cannot be loaded safely"):
        train(config, out_dir=out, resume=True)
