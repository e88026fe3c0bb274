"""MC dropout: per-structure masks in training, K seeded masks as weight samples, rate 0 = the plain model."""

import copy
import json

import h5py
import pytest
import torch
from nequip.data import AtomicDataDict

import mlip_uq.model.build as build
from mlip_uq.data import atoms_to_graph, collate, read_frames
from mlip_uq.inference.dropout import DropoutSettings, dropout_masks, dropout_posterior
from mlip_uq.model import ModelConfig, build_model
from mlip_uq.model.build import dropout_sites
from mlip_uq.posterior import Posterior, load_posterior
from mlip_uq.posterior.predict import predict_samples

#: every build here is a real build (not a copy of the session's first build of the same model, tests/conftest.py):
#: these tests check what building with and without dropout gives
FRESH_MODELS = True
TYPES = ["O", "Ti"]
# float64: masks are checked against weight-row zeroing at tight tolerances
SIZES = dict(type_names=TYPES, r_max=4.0, num_layers=2, num_features=8, radial_mlp_width=16, readout_hidden_width=8,
             dtype="float64")
RATE = 0.25


@pytest.fixture(scope="module")
def batch(tio2_path):
    frames = read_frames(tio2_path, index=":3")
    return collate([atoms_to_graph(a, TYPES, 4.0) for a in frames])


def outputs(model, batch):
    out = model(dict(batch))
    return out[AtomicDataDict.TOTAL_ENERGY_KEY].detach().view(-1), out[AtomicDataDict.FORCE_KEY].detach()


def test_rate_zero_builds_exactly_the_plain_model(batch):
    plain, zero = build_model(ModelConfig(**SIZES)), build_model(ModelConfig(**SIZES, dropout=0.0))
    assert repr(plain) == repr(zero) and not dropout_sites(zero)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))
    for mode in (True, False):
        for e, f in zip(outputs(plain.train(mode), batch), outputs(zero.train(mode), batch)):
            assert torch.equal(e, f)


def test_dropout_keeps_parameter_names_and_eval_mode_is_the_mean_network(batch):
    plain, dropped = build_model(ModelConfig(**SIZES)), build_model(ModelConfig(**SIZES, dropout=RATE))
    assert list(plain.state_dict()) == list(dropped.state_dict())
    assert set(dropout_sites(dropped)) == {
        "model.func.layer0_convnet.conv.edge_mlp.mlp.2.weight",
        "model.func.layer1_convnet.conv.edge_mlp.mlp.2.weight",
        "model.func.per_atom_energy_readout.mlp_module.mlp.2.weight",
    }
    for e, f in zip(outputs(plain.eval(), batch), outputs(dropped.eval(), batch)):
        assert torch.equal(e, f)
    torch.manual_seed(0)
    e1, _ = outputs(dropped.train(), batch)
    e2, _ = outputs(dropped, batch)
    assert not torch.allclose(e1, e2)  # training mode draws new masks every call
    copied = copy.deepcopy(dropped)  # the copy's modules read the frames its own hook sets
    torch.manual_seed(0)
    torch.testing.assert_close(outputs(copied, batch)[0], e1, rtol=0, atol=0)


def test_training_masks_are_per_structure(tio2_path):
    frame = read_frames(tio2_path, index=0)[0]
    twice = collate([atoms_to_graph(frame, TYPES, 4.0)] * 2)
    model = build_model(ModelConfig(**SIZES, dropout=RATE))
    e_eval, _ = outputs(model.eval(), twice)
    assert e_eval[0] == e_eval[1]
    torch.manual_seed(1)
    e_train, f_train = outputs(model.train(), twice)
    assert e_train[0] != e_train[1]  # the same structure twice in a batch: two weight draws
    n = len(frame)
    assert not torch.allclose(f_train[:n], f_train[n:])
    single, _ = outputs(model, atoms_to_graph(frame, TYPES, 4.0))  # an unbatched graph: one structure
    assert single.shape == (1,) and single[0] != e_eval[0]


def test_masks_differ_and_are_reproducible_from_a_seed():
    model = build_model(ModelConfig(**SIZES, dropout=RATE))
    a, b, c = (dropout_masks(model, RATE, 6, seed) for seed in (7, 7, 8))
    assert set(a) == set(dropout_sites(model))
    for name, m in a.items():
        assert m.shape == (6, dropout_sites(model)[name])
        assert torch.equal(m, b[name]) and not torch.equal(m, c[name])
        assert set(m.unique().tolist()) <= {0.0, 1 / (1 - RATE)}
    flat = torch.cat([m for m in a.values()], dim=1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(6) for j in range(i))
    many = torch.cat(list(dropout_masks(model, RATE, 400, 0).values()), dim=1)
    dropped = (many == 0).double().mean()
    assert abs(dropped - RATE) < 4 * (RATE * (1 - RATE) / many.numel()) ** 0.5


def test_posterior_samples_equal_the_model_with_the_same_masks(batch, monkeypatch):
    config = ModelConfig(**SIZES, dropout=RATE)
    model = build_model(config)
    with torch.no_grad():  # away from initialisation, so that masked units matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = model.state_dict()
    post = dropout_posterior(config, state, DropoutSettings(n_samples=4, seed=11))
    assert post.method == "dropout" and post.n_samples == 4
    assert set(post.samples) == set(dropout_sites(model))
    for name, t in post.shared.items():
        assert torch.equal(t, state[name])
    pred = predict_samples(post, batch)
    masks = dropout_masks(model, RATE, 4, 11)
    n_frames = int(batch[AtomicDataDict.NUM_NODES_KEY].numel())
    for k in range(4):
        # training mode, each site's draw replaced by mask k for every structure (sites are called in order)
        queue = [m[k].expand(n_frames, -1) for m in masks.values()]
        monkeypatch.setattr(build, "draw_keep", lambda rate, shape, like, generator=None: queue.pop(0).to(like))
        e, f = outputs(model.train(), batch)
        assert not queue
        torch.testing.assert_close(pred.energy[k], e, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(pred.forces[k], f, rtol=1e-12, atol=1e-10)
    assert not torch.allclose(pred.energy[0], pred.energy[1])


def test_files_without_a_dropout_rate_still_load(tmp_path):
    config = ModelConfig(**SIZES)
    path = tmp_path / "old.h5"
    Posterior.from_state_dicts(config, [build_model(config).state_dict()]).save(path)
    with h5py.File(path, "r+") as f:  # a file written before the rate existed
        old = json.loads(f.attrs["model_config"])
        del old["dropout"]
        f.attrs["model_config"] = json.dumps(old)
    assert load_posterior(path).config.dropout == 0.0


def test_bad_dropout_settings_are_reported():
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\)"):
        ModelConfig(**SIZES, dropout=1.0)
    with pytest.raises(ValueError, match="needs hidden units to drop"):
        build_model(ModelConfig(**{**SIZES, "readout_hidden_width": 0}, radial_mlp_depth=0, dropout=0.1))
    config = ModelConfig(**SIZES)
    with pytest.raises(ValueError, match="MC dropout needs model.dropout > 0"):
        dropout_posterior(config, build_model(config).state_dict(), DropoutSettings())
