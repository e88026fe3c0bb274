"""Deep ensembles: members as posterior samples, zero spread of identical members, bootstrap, kill and resume."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_model_config

import mlip_uq.inference.common as common
from mlip_uq.data import atoms_to_graph, fit_energy_references, read_frames
from mlip_uq.evaluate import predict_graphs
from mlip_uq.inference.ensemble import EnsembleSettings, fit_ensemble
from mlip_uq.inference.trainer import MAPSettings, PotentialModule
from mlip_uq.model import ModelConfig, build_model
from mlip_uq.posterior import Posterior

TYPES = ["O", "Ti"]


@pytest.fixture(scope="module")
def data(tio2_path):
    frames = read_frames(tio2_path, index=":30")
    graphs = [atoms_to_graph(a, TYPES, 4.0) for a in frames]
    config = tiny_model_config(TYPES, r_max=4.0, energy_shifts=fit_energy_references(frames[:24], TYPES), seed=10)
    return config, graphs[:24], graphs[24:]


def member_settings(**kw):
    return MAPSettings(**{"max_epochs": 2, "batch_size": 8, "lr": 0.01, "accelerator": "cpu", **kw})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    config, train, val = data
    out = tmp_path_factory.mktemp("ensemble")
    return fit_ensemble(config, train, val, EnsembleSettings(n_members=3, training=member_settings()), out), out


def test_members_are_the_posterior_samples_and_differ(trained):
    """Each sample is its member's trained state, but for the noise log-factors: every member's shifted by the
    same constant per quantity (the common factor fitted with the members' spread)."""
    post, out = trained
    assert post.method == "ensemble" and post.n_samples == 3
    assert post.hyperparameters["member_seeds"] == [10, 11, 12]
    name = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"
    shifts = {}
    for k in range(3):
        member = torch.load(out / "members" / str(k) / "final.pt", weights_only=True)
        for n, t in member.items():
            if n.endswith(("force_log_factor", "energy_log_factor")):
                shift = post.state_dict(k)[n] - t
                common_shift = shifts.setdefault(n, float(shift.flatten()[0]))
                torch.testing.assert_close(shift, torch.full_like(shift, common_shift))
            else:
                assert torch.equal(post.state_dict(k)[n], t), n
    assert len(shifts) == 2 and any(abs(s) > 1e-4 for s in shifts.values()), shifts
    w = post.samples[name]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_ensemble_mean_and_std_equal_those_of_its_members_one_by_one(trained, data):
    post, _ = trained
    _, _, val = data
    together = predict_graphs(post, val)
    members = [predict_graphs(Posterior(post.config, dict(post.shared), {n: t[k:k + 1] for n, t in post.samples.items()}),
                              val) for k in range(3)]
    energies = np.stack([m.energy_pred for m in members])
    forces = np.stack([m.forces_pred for m in members])
    np.testing.assert_allclose(together.energy_pred, energies.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(together.forces_pred, forces.mean(0), rtol=1e-12, atol=1e-12)
    # a mean-variance ensemble: the spread of the members' means plus the mean of their own (noise) variances
    noise_e = np.mean([m.energy_std**2 for m in members], axis=0)
    noise_f = np.mean([m.forces_std**2 for m in members], axis=0)
    np.testing.assert_allclose(together.energy_std**2, energies.var(0) + noise_e, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(together.forces_std**2, forces.var(0) + noise_f, rtol=1e-9, atol=1e-15)
    assert forces.std(0).min() > 0 and noise_f.min() > 0


def test_identical_members_have_zero_spread(data, tmp_path):
    config, train, val = data
    same = Posterior.from_state_dicts(config, [build_model(config).state_dict()] * 3)
    # warm start from three identical samples, learning rate 0 and the noise left as it is: the members stay
    # identical
    settings = member_settings(lr=0.0, max_epochs=1, noise_from_validation=False)
    post = fit_ensemble(config, train, val, EnsembleSettings(3, training=settings), tmp_path, init=same)
    assert post.hyperparameters["warm_start"]
    for name, t in post.samples.items():
        assert torch.equal(t[0], same.samples[name][0]) and torch.equal(t[2], same.samples[name][0])
    pred, one = predict_graphs(post, val), predict_graphs(same.replace(samples={n: t[:1] for n, t in same.samples.items()}), val)
    # no spread: the std is the members' noise alone (up to the rounding of the weighted mean, 1/3 + 1/3 + 1/3)
    np.testing.assert_allclose(pred.energy_std, one.energy_std, rtol=1e-6)
    np.testing.assert_allclose(pred.forces_std, one.forces_std, rtol=1e-6)


def test_bootstrap_resamples_the_training_set_per_member(data, tmp_path, monkeypatch):
    config, train, val = data
    seen = []

    def fake_fit_map(model, member_train, val, settings, out_dir, seed=0, resume=False):
        seen.append([next(i for i, g in enumerate(train) if g is h) for h in member_train])
        return model.state_dict()

    monkeypatch.setattr(common, "fit_map", fake_fit_map)
    fit_ensemble(config, train, val, EnsembleSettings(3, bootstrap=True, training=member_settings()), tmp_path / "a")
    fit_ensemble(config, train, val, EnsembleSettings(3, bootstrap=True, training=member_settings()), tmp_path / "b")
    first, again = seen[:3], seen[3:]
    assert first == again  # drawn from the members' seeds
    assert all(len(s) == len(train) and len(set(s)) < len(train) for s in first)  # with replacement
    assert first[0] != first[1] != first[2]
    seen.clear()
    fit_ensemble(config, train, val, EnsembleSettings(2, training=member_settings()), tmp_path / "c")
    assert seen == [list(range(len(train)))] * 2


def test_killed_ensemble_keeps_finished_members_and_resumes_the_unfinished_one(data, tmp_path, monkeypatch):
    config, train, val = data
    settings = EnsembleSettings(3, training=member_settings(checkpoint_seconds=0))  # last.ckpt every epoch
    epochs = []

    def count_and_kill(self):
        epochs.append(self.current_epoch)
        if len(epochs) == 4:  # member 1, epoch 1, before its checkpoint
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(PotentialModule, "on_train_epoch_end", count_and_kill, raising=False)
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit_ensemble(config, train, val, settings, tmp_path)
    monkeypatch.undo()
    members = tmp_path / "members"
    assert (members / "0" / "final.pt").is_file() and not (members / "1" / "final.pt").exists()
    assert (members / "1" / "checkpoints" / "last.ckpt").is_file()
    member0 = torch.load(members / "0" / "final.pt", weights_only=True)
    started = []
    monkeypatch.setattr(PotentialModule, "on_train_epoch_start", lambda self: started.append(self.current_epoch),
                        raising=False)
    post = fit_ensemble(config, train, val, settings, tmp_path, resume=True)
    # member 0 is not retrained; member 1 continues with its epoch 1; member 2 trains from scratch
    assert started == [1, 0, 1]
    assert post.n_samples == 3
    kept = torch.load(members / "0" / "final.pt", weights_only=True)
    assert all(torch.equal(kept[n], t) for n, t in member0.items())
    assert all(torch.equal(post.state_dict(0)[n], t) for n, t in member0.items() if "observation_noise" not in n)


def test_members_trained_in_parallel_processes_are_the_sequential_members(data, tmp_path, monkeypatch):
    config, train, val = data
    # 2 processes of 1 thread for the 3 members (one process trains two, one after the other), as the parent's
    # sequential run: no more threads than the 2 cores of CI, where a third process would only wait
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # with the same number of threads the kernels sum in the same order: the same members, bit for bit
        again = fit_ensemble(config, train, val, EnsembleSettings(3, training=member_settings()), tmp_path / "seq")
    finally:
        torch.set_num_threads(threads)
    parallel = fit_ensemble(config, train, val, EnsembleSettings(3, n_processes=2, training=member_settings()),
                            tmp_path / "par")
    assert [(tmp_path / "par" / "members" / str(k) / "final.pt").is_file() for k in range(3)] == [True] * 3
    for k in range(3):
        for name, value in again.state_dict(k).items():
            if "observation_noise" in name:  # times the common factor, fitted here with the parent's threads
                torch.testing.assert_close(parallel.state_dict(k)[name], value, rtol=1e-9, atol=1e-9)
            else:
                assert torch.equal(parallel.state_dict(k)[name], value), (k, name)
    first, second = parallel.state_dict(0), parallel.state_dict(1)
    assert any(not torch.equal(first[n], second[n]) for n in first)  # the members differ


def test_parallel_members_need_cpu_training():
    with pytest.raises(ValueError, match="CPU processes"):
        EnsembleSettings(2, n_processes=2, training=member_settings(accelerator="gpu"))


def test_bad_warm_starts_are_reported(data, tmp_path):
    config, train, val = data
    one = Posterior.from_state_dicts(config, [build_model(config).state_dict()])
    with pytest.raises(ValueError, match="init posterior has 1 samples; the ensemble needs one per member"):
        fit_ensemble(config, train, val, EnsembleSettings(2, training=member_settings()), tmp_path, init=one)
    other = ModelConfig(**{**config.to_dict(), "num_features": 8})
    wrong = Posterior.from_state_dicts(other, [build_model(other).state_dict()] * 2)
    with pytest.raises(ValueError, match="does not match the ensemble's architecture"):
        fit_ensemble(config, train, val, EnsembleSettings(2, training=member_settings()), tmp_path, init=wrong)
    with pytest.raises(ValueError, match="n_members must be at least 1"):
        EnsembleSettings(0)


def test_update_fine_tunes_at_a_tenth_of_the_training_learning_rate_by_default():
    from mlip_uq.config import ConfigError
    from mlip_uq.inference.ensemble import UpdateSettings

    settings = EnsembleSettings(2, training=member_settings(lr=0.01, max_epochs=150))
    assert UpdateSettings.from_dict({}, settings) == UpdateSettings(max_epochs=150, lr=pytest.approx(0.001))
    assert UpdateSettings.from_dict({"max_epochs": 20, "lr": 0.002}, settings) == UpdateSettings(20, 0.002)
    with pytest.raises(ConfigError, match="update.lr must be positive"):
        UpdateSettings.from_dict({"lr": 0.0}, settings)


def test_update_with_retrain_trains_every_member_afresh_with_the_training_settings(tmp_path, monkeypatch):
    import mlip_uq.inference.ensemble as ensemble
    from mlip_uq.posterior.io import PosteriorFileError

    fits = []

    class Fitted:
        def save(self, path):
            fits[-1]["saved"] = path

    def fake_fit_ensemble(config, train, val, settings, out_dir, resume=False, init=None, metadata=None):
        fits.append({"settings": settings, "init": init, "out": out_dir})
        return Fitted()

    monkeypatch.setattr(ensemble, "fit_ensemble", fake_fit_ensemble)
    settings = EnsembleSettings(2, training=member_settings(lr=0.01, max_epochs=150))
    context = SimpleNamespace(out_dir=tmp_path, settings=settings, model_config=None, train=[], val=[], resume=False,
                              metadata={})
    options = ensemble.UpdateSettings.from_dict({"retrain": True, "max_epochs": 20}, settings)
    path = ensemble.update(context, options, 3)  # round002 is not on disk: nothing is loaded
    assert fits == [{"settings": settings, "init": None, "out": tmp_path / "round003", "saved": path}]
    assert path == tmp_path / "round003" / "posterior.h5"
    with pytest.raises(PosteriorFileError, match="round002"):  # a fine-tuning update starts from round 2
        ensemble.update(context, ensemble.UpdateSettings.from_dict({}, settings), 3)
