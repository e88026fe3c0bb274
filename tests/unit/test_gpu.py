"""The CUDA path gives the CPU's predictions (skipped on machines without a CUDA device)."""

import pytest
import torch
from ase.build import molecule
from nequip.data import AtomicDataDict

from mlip_uq.data import atoms_to_graph, collate
from mlip_uq.model import ModelConfig, build_model
from mlip_uq.posterior import Posterior
from mlip_uq.posterior.predict import predict_samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_predictions_equal_cpu_predictions():
    config = ModelConfig(type_names=["H", "C", "O"], r_max=4.0, num_layers=2, num_features=8, noise="head")
    post = Posterior.from_state_dicts(config, [build_model(ModelConfig.from_dict({**config.to_dict(), "seed": s})).state_dict()
                                               for s in (0, 1)])
    batch = collate([atoms_to_graph(molecule("CH3CH2OH"), config.type_names, config.r_max, with_labels=False)])
    cpu = predict_samples(post, batch)
    gpu = predict_samples(post.to("cuda"), AtomicDataDict.to_(batch, torch.device("cuda")))
    for name in ("energy", "forces", "forces_noise_var"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=1e-9, atol=1e-9)
