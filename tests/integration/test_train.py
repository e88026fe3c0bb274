"""``mlip-uq train`` / ``evaluate`` end to end on a small part of the bundled TiO2 subset."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_tio2_config

from mlip_uq.cli import main
from mlip_uq.data import FrameStore
from mlip_uq.evaluate import predict_graphs
from mlip_uq.inference.trainer import PotentialModule
from mlip_uq.model import build_model
from mlip_uq.posterior import Posterior, load_posterior
from mlip_uq.testing import PosteriorContract
from mlip_uq.train import train

DESIGN_KEYS = {"energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "n_structures", "n_samples"}


def small_config(tio2_path, **training):
    return tiny_tio2_config(tio2_path, 60, 12, training={
        "max_epochs": 8, "batch_size": 6, "lr": 0.01, "loss_weights": {"energy": 1.0, "forces": 1.0}, **training})


def epoch_metrics(out):
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    return [(int(r["epoch"]), float(r["val_forces_mae"])) for r in rows if r.get("val_forces_mae")]


@pytest.fixture(scope="module")
def trained(tio2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(small_config(tio2_path, max_epochs=20), out_dir=out)


def test_training_writes_posterior_metrics_plot_and_lowers_validation_error(trained):
    out = trained
    for name in ("posterior.h5", "metrics.json", "parity.png", "config.yaml", "splits.json", "data.h5"):
        assert (out / name).is_file(), name
    assert len(epoch_metrics(out)) == 20
    # the same architecture and seed before training, against the trained posterior, on the validation set
    post = load_posterior(out / "posterior.h5")
    store = FrameStore.open(out / "data.h5")
    val = store.graphs(json.loads((out / "splits.json").read_text())["val"])
    untrained = Posterior.from_state_dicts(post.config, [build_model(post.config).state_dict()])
    before, after = predict_graphs(untrained, val), predict_graphs(post, val)
    def mae(p):
        return np.abs(p.forces_pred - p.forces_true).mean()

    assert mae(after) < 0.75 * mae(before)
    metrics = json.loads((out / "metrics.json").read_text())
    assert DESIGN_KEYS <= set(metrics) and metrics["n_structures"] == 12 and metrics["n_samples"] == 1
    post = load_posterior(out / "posterior.h5")
    assert post.n_samples == 1 and post.method == "map"
    assert post.energy_references == {"O": -432.503149303, "Ti": -1604.604515075}
    assert len(post.data_fingerprint) == 64
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"]) and len(splits["train"]) == 60


def test_posterior_holds_the_best_validation_epoch(trained):
    best = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    post = load_posterior(trained / "posterior.h5")
    name = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"
    torch.testing.assert_close(post.samples[name][0], best["model." + name], rtol=0, atol=0)


def test_evaluate_cli_reproduces_metrics_and_plots(trained, tio2_path, tmp_path, capsys):
    rc = main(["evaluate", str(trained / "posterior.h5"), str(tio2_path), "--out", str(tmp_path / "m.json"),
               "--plots", str(tmp_path / "plots"), "--split", str(trained / "splits.json")])
    assert rc == 0
    metrics, run = json.loads((tmp_path / "m.json").read_text()), json.loads((trained / "metrics.json").read_text())
    assert metrics["n_structures"] == run["n_structures"] == 12 and DESIGN_KEYS <= set(metrics)
    for key in ("energy_mae", "forces_mae", "forces_nll"):  # the run's own test metrics, from the file alone
        assert metrics[key] == pytest.approx(run[key], rel=1e-6), key
    assert (tmp_path / "plots" / "parity.png").stat().st_size > 5000


def test_killed_run_resumes_from_its_last_checkpoint(tio2_path, tmp_path, monkeypatch):
    config = small_config(tio2_path, max_epochs=4, checkpoint_seconds=0)  # last.ckpt after every epoch

    def killed_after_epoch_1(self):
        if self.current_epoch == 1:
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(PotentialModule, "on_train_epoch_end", killed_after_epoch_1, raising=False)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(config, out_dir=tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "posterior.h5").exists()
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    epochs_run = []
    monkeypatch.setattr(PotentialModule, "on_train_epoch_start", lambda self: epochs_run.append(self.current_epoch),
                        raising=False)
    train(config, out_dir=tmp_path, resume=True)
    # the kill came before epoch 1 was checkpointed: the run continues with epoch 1, not from scratch
    assert first["epoch"] == 0 and epochs_run == [1, 2, 3]
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 4 * first["global_step"]  # 4 epochs of optimiser steps in all
    assert (tmp_path / "posterior.h5").is_file()


def test_last_checkpoint_waits_for_its_interval_and_is_written_when_training_ends(tio2_path, tmp_path, monkeypatch):
    import lightning as L

    writes, original = [], L.Trainer.save_checkpoint

    def recorded(trainer, path, *args, **kwargs):
        writes.append((Path(path).name, trainer.current_epoch))
        return original(trainer, path, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", recorded)
    train(small_config(tio2_path, max_epochs=3, checkpoint_seconds=1e6), out_dir=tmp_path)
    monkeypatch.undo()
    # no epoch ended an interval after the start: last.ckpt once, when the third epoch had ended
    assert [w for w in writes if w[0] == "last.ckpt"] == [("last.ckpt", 3)]
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 3 * 10  # 60 structures in batches of 6
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    assert "optimizer_states" not in best and best["state_dict"]  # the best weights only
    from mlip_uq.inference.trainer import MAPSettings

    with pytest.raises(ValueError, match="checkpoint_seconds must be >= 0"):
        MAPSettings(checkpoint_seconds=-1)


def test_resume_refuses_a_changed_configuration(trained, tio2_path, tmp_path):
    import shutil

    run = shutil.copytree(trained, tmp_path / "run")  # the module's run, as it started with small_config(max_epochs=20)
    changed = small_config(tio2_path, max_epochs=20, lr=0.5)
    with pytest.raises(ValueError, match="differs from the one the run"):
        train(changed, out_dir=run, resume=True)


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: map\ndata: {path: x.extxyz}\nmodle: {}\n")
    assert main(["train", str(bad)]) == 2
    assert "unknown configuration section(s) ['modle']" in capsys.readouterr().err
    good = tmp_path / "ok.yaml"
    good.write_text(f"data: {{path: {tmp_path / 'nothing.extxyz'}}}\n")
    assert main(["train", str(good), "training.max_epochs"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "none.h5"), str(good)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("noise", ["learned", "head"])
def test_map_learns_its_noise_jointly_and_reports_predictive_stds(tio2_path, tmp_path, noise):
    cfg = small_config(tio2_path, max_epochs=3)
    cfg["model"]["noise"] = noise
    out = train(cfg, out_dir=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_samples"] == 1 and metrics["forces_sharpness"] > 0 and metrics["energy_sharpness"] > 0
    assert np.isfinite(metrics["forces_nll"]) and np.isfinite(metrics["energy_nll"])
    post = load_posterior(out / "posterior.h5")
    learned = {**post.shared, **post.samples}
    for name in ("force_log_factor", "energy_log_factor"):  # moved away from the configured stds
        assert learned[f"model.func.observation_noise.{name}"].abs().min() > 1e-3, name


class TestMAPPosterior(PosteriorContract):
    """The posterior contract (:mod:`mlip_uq.testing`) for method map."""

    @pytest.fixture
    def contract_posterior(self, trained):
        return load_posterior(trained / "posterior.h5")
