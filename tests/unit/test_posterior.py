"""Posterior container, its HDF5 file and per-sample prediction."""

import re

import h5py
import numpy as np
import pytest
import torch
from ase.build import molecule
from conftest import untrained_state_dict

from mlip_uq.data.graph import atoms_to_graph, collate
from mlip_uq.model import ModelConfig
from mlip_uq.posterior import Posterior, PosteriorFileError, load_posterior
from mlip_uq.posterior.predict import predict_samples

CONFIG = ModelConfig(type_names=["H", "C", "O"], r_max=4.0, num_layers=2, num_features=8, radial_mlp_width=16,
                     energy_shifts={"H": -13.6, "C": -1030.0, "O": -432.5}, avg_num_neighbors=6.0, noise="head")


def batch():
    frames = []
    for seed in range(3):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=seed)
        frames.append(atoms_to_graph(atoms, CONFIG.type_names, CONFIG.r_max, with_labels=False))
    return collate(frames)


def state_dicts(seeds):
    return [untrained_state_dict(CONFIG, s) for s in seeds]


def test_save_load_gives_identical_predictions(tmp_path):
    post = Posterior.from_state_dicts(CONFIG, state_dicts([0, 1, 2]), method="ensemble",
                                      energy_references={"H": -13.6}, data_fingerprint="abc")
    post.save(tmp_path / "p.h5")
    loaded = load_posterior(tmp_path / "p.h5")
    assert loaded.n_samples == 3 and loaded.method == "ensemble" and loaded.data_fingerprint == "abc"
    assert loaded.config == CONFIG
    a, b = predict_samples(post, batch()), predict_samples(loaded, batch())
    for name in ("energy", "atomic_energy", "forces", "forces_noise_var"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert a.stress is None  # molecules: no stress


def test_file_reads_with_plain_h5py_and_holds_no_pickles(tmp_path):
    post = Posterior.from_state_dicts(CONFIG, state_dicts([0, 1]))
    post.save(tmp_path / "p.h5")
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert f.attrs["format"] == "mlip_uq.Posterior"
        kinds = set()
        f.visititems(lambda name, obj: kinds.add(obj.dtype.kind) if isinstance(obj, h5py.Dataset) else None)
        assert kinds <= {"f", "i", "u", "b"}  # numeric arrays only: nothing opaque to unpickle
        name = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"
        np.testing.assert_array_equal(f["samples"][name][1], post.samples[name][1].numpy())
        assert f["weights"].shape == (2,)


def test_different_samples_differ_and_identical_samples_agree():
    post = Posterior.from_state_dicts(CONFIG, state_dicts([0, 0, 1]))
    pred = predict_samples(post, batch())
    torch.testing.assert_close(pred.forces[0], pred.forces[1], rtol=0, atol=0)
    assert not torch.allclose(pred.forces[0], pred.forces[2])
    # the mean and variance over samples are the plain weighted moments
    torch.testing.assert_close(pred.mean(pred.energy), pred.energy.mean(0))
    torch.testing.assert_close(pred.epistemic_var(pred.energy), pred.energy.var(0, unbiased=False))


def test_partial_posterior_stores_shared_tensors_once(tmp_path):
    sds = state_dicts([0])
    readout = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"
    samples = [dict(sds[0], **{readout: sds[0][readout] + i}) for i in range(4)]
    post = Posterior.from_state_dicts(CONFIG, samples, stochastic=[readout])
    assert post.stochastic_names == [readout] and post.samples[readout].shape[0] == 4
    post.save(tmp_path / "p.h5")
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert list(f["samples"]) == [readout]
        assert f["shared"]["model.func.type_embed.embed_module.weight"].ndim == 2
    with pytest.raises(ValueError, match="shared tensor .* differs"):
        Posterior.from_state_dicts(CONFIG, state_dicts([0, 1]), stochastic=[readout])


def test_truncated_foreign_and_missing_files_give_clear_errors(tmp_path):
    post = Posterior.from_state_dicts(CONFIG, state_dicts([0]))
    post.save(tmp_path / "p.h5")
    data = (tmp_path / "p.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(PosteriorFileError, match="truncated or not HDF5"):
        load_posterior(tmp_path / "cut.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(PosteriorFileError, match="not an mlip_uq posterior"):
        load_posterior(tmp_path / "foreign.h5")
    with pytest.raises(PosteriorFileError, match="does not exist"):
        load_posterior(tmp_path / "nothing.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(PosteriorFileError, match="not HDF5"):
        load_posterior(tmp_path / "text.h5")


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.attrs.__delitem__("format_version"), "no format_version attribute"),
    (lambda f: f.attrs.__delitem__("model_config"), "incomplete posterior file.*model_config"),
    (lambda f: f.attrs.__delitem__("calibration"), "incomplete posterior file.*calibration"),
    (lambda f: f.__delitem__("weights"), "incomplete posterior file.*weights"),
    (lambda f: f.attrs.__setitem__("model_config", "{not json"), "damaged posterior file"),
    (lambda f: f.attrs.__setitem__("model_config", "[1, 2]"), "damaged posterior file"),
])
def test_posterior_file_missing_or_damaged_metadata_names_what_is_wrong(tmp_path, damage, message):
    Posterior.from_state_dicts(CONFIG, state_dicts([0])).save(tmp_path / "p.h5")
    with h5py.File(tmp_path / "p.h5", "a") as f:
        damage(f)
    with pytest.raises(PosteriorFileError, match=message):
        load_posterior(tmp_path / "p.h5")


def test_file_whose_tensors_do_not_match_its_config_is_rejected(tmp_path):
    post = Posterior.from_state_dicts(CONFIG, state_dicts([0]))
    post.save(tmp_path / "p.h5")
    name = "model.func.type_embed.embed_module.weight"
    with h5py.File(tmp_path / "p.h5", "a") as f:
        weight = f["samples"][name][()]
        del f["samples"][name]
    with pytest.raises(PosteriorFileError, match=f"does not match its own model config: missing tensors \\['{name}'\\]"):
        load_posterior(tmp_path / "p.h5")
    with h5py.File(tmp_path / "p.h5", "a") as f:
        f["samples"][name] = weight[:, :-1]
    cut = (weight.shape[1] - 1, *weight.shape[2:])
    with pytest.raises(PosteriorFileError, match=re.escape(f"{name} has shape {cut}, the model's is {weight.shape[1:]}")):
        load_posterior(tmp_path / "p.h5")


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "p.h5"
    Posterior.from_state_dicts(CONFIG, state_dicts([0]), method="first").save(path)
    other = Posterior.from_state_dicts(CONFIG, state_dicts([1]), method="second")

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(h5py.Group, "create_dataset", explode)
    with pytest.raises(KeyboardInterrupt):
        other.save(path)
    monkeypatch.undo()
    assert load_posterior(path).method == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.h5"]


def test_bad_weights_and_sample_counts_are_rejected():
    sds = state_dicts([0, 1])
    with pytest.raises(ValueError, match="sample weights"):
        Posterior.from_state_dicts(CONFIG, sds, weights=torch.tensor([1.0, -1.0]))
    post = Posterior.from_state_dicts(CONFIG, sds, weights=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(post.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(IndexError):
        post.state_dict(2)


def test_as_dtype_casts_the_tensors_and_keeps_the_rest():
    post = Posterior.from_state_dicts(CONFIG, state_dicts([0, 1]), method="ensemble", weights=torch.tensor([1.0, 3.0]),
                                      energy_references={"H": -13.6}, data_fingerprint="abc")
    own, other = post.config.dtype, {"float32": "float64", "float64": "float32"}[post.config.dtype]
    assert post.as_dtype(own) is post  # already its dtype
    cast = post.as_dtype(other)
    assert cast.config.dtype == other and post.config.dtype == own
    floating = [t for t in {**cast.shared, **cast.samples}.values() if t.is_floating_point()]
    assert floating and all(t.dtype == getattr(torch, other) for t in floating)
    assert (cast.method, cast.energy_references, cast.data_fingerprint) == ("ensemble", {"H": -13.6}, "abc")
    torch.testing.assert_close(cast.weights, post.weights, rtol=0, atol=0)
    with pytest.raises(ValueError, match="dtype"):
        post.as_dtype("float16")
