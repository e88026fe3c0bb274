"""The method protocol: a toy method registered in the table trains through ``mlip-uq train``; typed settings
name the offending key, its value and the expected type."""

from dataclasses import asdict, dataclass
from typing import ClassVar, Dict, Optional, Tuple

import pytest
import torch
import yaml
from conftest import tiny_tio2_config

from mlip_uq.cli import main
from mlip_uq.config import ConfigError, load_config, settings_from
from mlip_uq.inference import METHODS, Method, method_sections
from mlip_uq.model import build_model
from mlip_uq.posterior import Posterior, load_posterior
from mlip_uq.train import method_settings

READOUT = "model.func.per_atom_energy_readout.mlp_module.mlp.0.weight"


@dataclass
class Settings:
    """The toy method: K copies of the initial model, the readout weight shifted by k · ``shift``."""

    n_samples: int = 3
    shift: float = 0.01
    reference: Optional[str] = None

    PATHS: ClassVar[Tuple[str, ...]] = ("toy.reference",)

    @classmethod
    def from_dict(cls, config: Dict) -> "Settings":
        return settings_from(cls, config.get("toy"), "toy")


def fit(context) -> Posterior:
    state = build_model(context.model_config).state_dict()
    readout = state.pop(READOUT)
    steps = context.settings.shift * torch.arange(context.settings.n_samples, dtype=readout.dtype)
    samples = {READOUT: readout + steps[:, None, None]}
    posterior = Posterior(context.model_config, state, samples, method="toy",
                          hyperparameters=asdict(context.settings), **context.metadata)
    posterior.save(context.posterior_path)
    return posterior


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", Method(__name__, ("toy",)))


def test_a_method_is_one_module_and_one_table_entry(toy_method, tio2_path, tio2_store, tmp_path, capsys):
    cfg = tiny_tio2_config(tio2_path, 16, 4, method="toy", toy={"n_samples": 4, "reference": "ref.h5"})
    cfg["data"]["store"] = str(tio2_store)
    path = tmp_path / "configs" / "toy.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "toy.shift=0.5"]) == 0
    post = load_posterior(tmp_path / "run" / "posterior.h5")
    assert post.method == "toy" and post.n_samples == 4
    assert post.hyperparameters == {"n_samples": 4, "shift": 0.5, "reference": str(tmp_path / "configs" / "ref.h5")}
    torch.testing.assert_close(post.samples[READOUT][3] - post.samples[READOUT][0],
                               torch.full_like(post.samples[READOUT][0], 1.5))
    assert (tmp_path / "run" / "metrics.json").is_file() and "forces MAE" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["toy"]["reference"] == str(tmp_path / "configs" / "ref.h5")  # a declared path, resolved


def test_without_its_table_entry_the_section_is_unknown(tmp_path):
    assert "toy" not in method_sections()
    with pytest.raises(ConfigError, match=r"unknown configuration section\(s\) \['toy'\]"):
        load_config({"data": {"path": "a"}, "toy": {}})


@pytest.mark.parametrize("method, section, message", [
    ("map", {"training": {"max_epochs": "ten"}}, "training.max_epochs='ten': expected an integer"),
    ("map", {"training": {"patience": 2.5}}, "training.patience=2.5: expected an integer"),
    ("map", {"training": {"loss_weights": 3}}, "training.loss_weights=3: expected a mapping"),
    ("map", {"training": {"loss_weights": {"forces": "high"}}},
     "training.loss_weights.forces='high': expected a number"),
    ("map", {"training": {"max_time_minutes": "1h"}}, "training.max_time_minutes='1h': expected a number or null"),
    ("map", {"training": {"max_epochs": True}}, "training.max_epochs=True: expected an integer"),
    ("sgmcmc", {"sgmcmc": {"lr": "fast"}}, "sgmcmc.lr='fast': expected a number"),
    ("sgmcmc", {"sgmcmc": {"n_chains": 1.5}}, "sgmcmc.n_chains=1.5: expected an integer"),
    ("sgmcmc", {"sgmcmc": {"noise": {"forces": 0.1}}}, "sgmcmc.noise: the observation noise is part of the model"),
    ("sgmcmc", {"sgmcmc": {"prior": 1.0}}, "sgmcmc.prior=1.0: expected a mapping"),
    ("sgmcmc", {"sgmcmc": {"stochastic": {"last_layers": "two"}}},
     "sgmcmc.stochastic.last_layers='two': expected an integer"),
    ("sgmcmc", {"sgmcmc": {"stochastic": "some"}}, "sgmcmc.stochastic='some': expected 'all'"),
    ("vi", {"vi": {"init": 5}}, "vi.init=5: expected a string or null"),
    ("ensemble", {"ensemble": {"bootstrap": "no"}}, "ensemble.bootstrap='no': expected true or false"),
    ("dropout", {"dropout": {"n_samples": "20"}, "model": {"dropout": 0.1}},
     "dropout.n_samples='20': expected an integer"),
    ("map", {"model": {"num_layerz": 2}}, r"unknown model option\(s\) \['num_layerz'\]"),
])
def test_mistyped_options_name_key_value_and_expected_type(method, section, message):
    cfg = load_config({"data": {"path": "/data.extxyz"}, "method": method, **section})
    with pytest.raises(ConfigError, match=message):
        method_settings(cfg)
