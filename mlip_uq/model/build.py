"""Build the NequIP model that every posterior sample shares.

The backbone is nequip's own ``NequIPGNNModel`` (type embedding, Bessel/polynomial-cutoff radial basis,
spherical harmonics, gated interaction blocks, per-atom energy readout with per-type scale and shift, and
``ForceStressOutput`` for forces and stress by autograd). mlip_uq adds the **observation noise** of the Gaussian
likelihood to the model (:class:`ObservationNoise`, after the energy readout), so that every method trains or
samples it with the other parameters and every posterior sample carries its own: a force-noise std per element
(``model.noise: learned``, the default), optionally times a per-atom factor from a heteroscedastic noise head that
reads the same invariant node features as the energy readout (``noise: head``), an energy-per-atom noise std and a
stress noise std. With ``noise: fixed`` the same block holds the given stds as buffers (not trained, not sampled).
Its outputs are the log-stds ``atomic_log_sigma`` (node, log eV/Å), ``energy_per_atom_log_sigma`` and
``stress_log_sigma`` (graph, log eV/atom and log eV/Å³), read by the likelihood
(:mod:`mlip_uq.inference.loss`) and by prediction as the aleatoric variance.

With ``dropout > 0`` the hidden units of the invariant (scalar) MLPs — each interaction block's radial network
and the energy readout's hidden layer — are dropped in training mode (:class:`HiddenUnitDropout`, wrapped
around the parameter-free nonlinearity, so parameter names are unchanged). One mask is drawn **per structure**
and shared by all of its edges and atoms: each structure sees one weight draw, a smooth energy-conserving
model, as MC dropout's variational reading requires (nn.Dropout's independent mask per edge and atom would make
the energy of a structure a function of many different weight draws). In eval mode the model is the plain
(mean) network; ``dropout = 0`` builds exactly the model without dropout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from nequip.data import AtomicDataDict
from nequip.model import NequIPGNNModel
from nequip.model.utils import model_builder
from nequip.nn import GraphModel, GraphModuleMixin, ScalarMLP
from nequip.nn.mlp import ScalarLinearLayer, ScalarMLPFunction

from .._keys import ENERGY_LOG_SIGMA_KEY, PER_ATOM_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY

NOISE_KINDS = ("learned", "head", "fixed")


@dataclass
class ModelConfig:
    """Plain hyper-parameters of the model (JSON-serialisable; stored in every posterior file).

    Args:
        type_names: element symbols the model knows, in type-index order (e.g. ``["O", "Ti"]``).
        r_max: cutoff radius (Å).
        num_layers: number of interaction blocks.
        l_max: maximum rotation order of the equivariant features.
        num_features: feature multiplicity per irrep.
        parity: whether to carry odd-parity features as well (slower, rarely more accurate).
        radial_mlp_depth: hidden layers of each radial network.
        radial_mlp_width: width of each radial network.
        num_bessels: number of Bessel radial basis functions.
        polynomial_cutoff_p: exponent of the polynomial cutoff envelope.
        readout_hidden_width: width of one hidden layer in the energy readout (0: linear readout).
        avg_num_neighbors: neighbour-sum normalisation, the training-set mean number of neighbours
            (1.0: no normalisation; training fills it from the data when the config leaves it out).
        energy_shifts: per-element energy shift (eV), normally the isolated-atom reference energies.
        energy_scale: per-atom energy scale (eV), normally the training-set force RMS.
        noise: the observation noise (:class:`ObservationNoise`): ``"learned"`` (trainable force-noise std per
            element, energy and stress noise stds), ``"head"`` (as learned, the force std times a per-atom factor
            from the noise head: heteroscedastic) or ``"fixed"`` (the stds below, not trained).
        force_noise: force-noise std of each component (eV/Å): the fixed value, or the initial one.
        energy_noise: noise std of the energy per atom (eV/atom): the fixed value, or the initial one.
        stress_noise: noise std of each stress component (eV/Å³): the fixed value, or the initial one.
        dropout: probability of dropping a hidden unit of the radial networks and the readout's hidden layer
            in training mode (0: no dropout, the model is unchanged); used by MC dropout.
        seed: seed for parameter initialisation.
        dtype: ``"float32"`` (default: about twice as fast; nequip still sums the per-atom energies into the
            total energy in float64) or ``"float64"`` (for checks with tight tolerances, e.g. finite-difference
            forces).
    """

    type_names: List[str]
    r_max: float = 5.0
    num_layers: int = 3
    l_max: int = 1
    num_features: int = 32
    parity: bool = False
    radial_mlp_depth: int = 1
    radial_mlp_width: int = 64
    num_bessels: int = 8
    polynomial_cutoff_p: int = 6
    readout_hidden_width: int = 0
    avg_num_neighbors: float = 1.0
    energy_shifts: Optional[Dict[str, float]] = None
    energy_scale: float = 1.0
    noise: str = "learned"
    force_noise: float = 0.1
    energy_noise: float = 0.01
    stress_noise: float = 0.01
    dropout: float = 0.0
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        self.type_names = list(self.type_names)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.r_max <= 0:
            raise ValueError(f"r_max must be positive (Å), got {self.r_max}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {list(NOISE_KINDS)}, got {self.noise!r}")
        for name in ("force_noise", "energy_noise", "stress_noise"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive std, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout}")
        if self.energy_shifts is not None:
            missing = set(self.type_names) - set(self.energy_shifts)
            if missing:
                raise ValueError(f"energy_shifts has no value for element(s) {sorted(missing)}")
            self.energy_shifts = {t: float(self.energy_shifts[t]) for t in self.type_names}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


def draw_keep(rate: float, shape, like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Inverted-dropout multipliers of ``shape``: 0 with probability ``rate``, else ``1 / (1 - rate)``, so that a
    unit's expected output is unchanged. ``generator``: a seeded ``torch.Generator`` (default: torch's global one)."""
    u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    return (u >= rate).to(like) / (1.0 - rate)


class _FrameIndex:
    """The structure (frame) of every atom and edge of the batch being evaluated, set before each forward."""

    def __init__(self):
        self.n_frames = 1
        self.rows: Dict[str, torch.Tensor] = {}

    def __call__(self, module: torch.nn.Module, args) -> None:
        """Forward pre-hook of the energy model: read the frame of every atom and edge of ``args[0]``."""
        data = args[0]
        n_atoms = data[AtomicDataDict.POSITIONS_KEY].shape[0]
        atom = data.get(AtomicDataDict.BATCH_KEY)
        if atom is None:
            atom = torch.zeros(n_atoms, dtype=torch.long, device=data[AtomicDataDict.POSITIONS_KEY].device)
        self.n_frames = AtomicDataDict.num_frames(data)
        self.rows = {"atoms": atom, "edges": atom[data[AtomicDataDict.EDGE_INDEX_KEY][0]]}


class HiddenUnitDropout(torch.nn.Module):
    """A parameter-free nonlinearity followed by dropout of its output units, one mask per structure.

    Args:
        activation: the MLP's nonlinearity (e.g. ``SiLU``), applied first.
        rate: drop probability of each hidden unit.
        rows: ``"edges"`` (radial networks) or ``"atoms"`` (readout): what a row of the input belongs to.
        frames: the frame index of the current batch, shared by all dropout modules of a model (it is the
            energy model's forward pre-hook).

    In training mode a mask (n_frames, width) is drawn with :func:`draw_keep` and row r is multiplied by the
    mask of its structure; in eval mode it is the plain nonlinearity. Masking hidden unit j equals zeroing row
    j of the next linear layer's weight (shape (width, out)) and scaling it by 1/(1 − rate), which is how
    :mod:`mlip_uq.inference.dropout` turns K masks into K weight samples.
    """

    def __init__(self, activation: torch.nn.Module, rate: float, rows: str, frames: _FrameIndex):
        super().__init__()
        self.activation = activation
        self.rate = rate
        self.rows = rows
        self._frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(x)
        if not self.training:
            return h
        keep = draw_keep(self.rate, (self._frames.n_frames, h.shape[-1]), h)
        return h * keep[self._frames.rows[self.rows]]

    def extra_repr(self) -> str:
        return f"rate={self.rate}, one mask per structure over {self.rows}"


def _add_dropout(energy_model: torch.nn.Module, rate: float) -> None:
    """Wrap the nonlinearities of the radial networks and the readout in :class:`HiddenUnitDropout`."""
    frames = _FrameIndex()
    wrapped = 0
    for name, module in energy_model.named_modules():
        if name.endswith("edge_mlp"):
            rows = "edges"
        elif name == "per_atom_energy_readout.mlp_module":
            rows = "atoms"
        else:
            continue
        assert isinstance(module, ScalarMLPFunction) and isinstance(module.mlp, torch.nn.Sequential), name
        for i, layer in enumerate(module.mlp):
            if not isinstance(layer, ScalarLinearLayer):
                module.mlp[i] = HiddenUnitDropout(layer, rate, rows, frames)
                wrapped += 1
    if not wrapped:
        raise ValueError("model.dropout needs hidden units to drop: radial_mlp_depth >= 1 or readout_hidden_width > 0")
    # a callable object, not a closure: copy.deepcopy of the model then copies the hook with its modules
    energy_model.register_forward_pre_hook(frames)


def dropout_sites(model: torch.nn.Module) -> Dict[str, int]:
    """``{weight name: hidden width}`` of each linear layer that reads a dropped-out hidden layer (the rows of
    that weight are what a dropout mask zeroes). Empty for a model without dropout."""
    params = dict(model.named_parameters())
    sites = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Sequential):
            for i, layer in enumerate(module):
                if isinstance(layer, HiddenUnitDropout):
                    weight = f"{name}.{i + 1}.weight"
                    sites[weight] = params[weight].shape[0]
    return sites


class ObservationNoise(GraphModuleMixin, torch.nn.Module):
    """The noise stds of the Gaussian likelihood, as log-stds in the graph dict (module docstring).

    Each log-std is a fixed reference ``log σ₀`` (buffer: the configured std) plus a log-factor, a trainable
    parameter starting at 0 (or a zero buffer with ``trainable=False``): ``log σ = log σ₀ + log-factor``. A
    zero-centred prior on the log-factors (:mod:`mlip_uq.inference.priors`) is thus centred on the configured stds.

    Args:
        type_names: the model's elements; the force-noise std is per element.
        force_noise, energy_noise, stress_noise: the reference stds σ₀ (eV/Å, eV/atom, eV/Å³).
        trainable: log-factors as parameters (trained and sampled with the model) or zero buffers (fixed stds).
        heteroscedastic: add the per-atom log-factor the noise head wrote into ``atomic_log_sigma`` to each atom's
            force log-std, and scale a frame's energy std by the mean over its atoms of the head's factor (so
            that the energy noise, like the force noise, is larger for structures the head finds harder).
        irreps_in: irreps of the incoming fields.
    """

    def __init__(self, type_names: List[str], force_noise: float, energy_noise: float, stress_noise: float,
                 trainable: bool, heteroscedastic: bool, irreps_in=None):
        super().__init__()
        self.heteroscedastic = heteroscedastic
        scalar = "1x0e"
        self._init_irreps(
            irreps_in=irreps_in,
            my_irreps_in={PER_ATOM_LOG_SIGMA_KEY: scalar} if heteroscedastic else {},
            irreps_out={PER_ATOM_LOG_SIGMA_KEY: scalar, ENERGY_LOG_SIGMA_KEY: scalar, STRESS_LOG_SIGMA_KEY: scalar},
        )
        shapes = {"force": len(type_names), "energy": 1, "stress": 1}
        for name, sigma in (("force", force_noise), ("energy", energy_noise), ("stress", stress_noise)):
            self.register_buffer(f"{name}_log_sigma0", torch.full((shapes[name],), math.log(sigma)))
            factor = torch.zeros(shapes[name])
            if trainable:
                self.register_parameter(f"{name}_log_factor", torch.nn.Parameter(factor))
            else:
                self.register_buffer(f"{name}_log_factor", factor)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        per_type = self.force_log_sigma0 + self.force_log_factor
        log_sigma = per_type[data[AtomicDataDict.ATOM_TYPE_KEY].view(-1)].unsqueeze(-1)
        n_frames = AtomicDataDict.num_frames(data)
        energy_log_sigma = (self.energy_log_sigma0 + self.energy_log_factor).expand(n_frames, 1)
        if self.heteroscedastic:
            head = data[PER_ATOM_LOG_SIGMA_KEY]
            log_sigma = log_sigma + head
            frame = data.get(AtomicDataDict.BATCH_KEY)
            if frame is None:
                frame = torch.zeros(head.shape[0], dtype=torch.long, device=head.device)
            frame = frame.view(-1)
            totals = torch.zeros(n_frames, 1, dtype=head.dtype, device=head.device).index_add(0, frame, head.exp())
            counts = torch.bincount(frame, minlength=n_frames).to(head.dtype).unsqueeze(-1)
            energy_log_sigma = energy_log_sigma + torch.log(totals / counts)
        data[PER_ATOM_LOG_SIGMA_KEY] = log_sigma
        data[ENERGY_LOG_SIGMA_KEY] = energy_log_sigma
        data[STRESS_LOG_SIGMA_KEY] = (self.stress_log_sigma0 + self.stress_log_factor).expand(n_frames, 1)
        return data


@model_builder
def _uq_nequip(noise: str, force_noise: float, energy_noise: float, stress_noise: float, dropout: float,
               **kwargs) -> GraphModel:
    # nested inside this builder, NequIPGNNModel returns its ForceStressOutput unwrapped, built under the
    # seed and dtype set by the outer @model_builder
    model = NequIPGNNModel(**kwargs)
    energy_model = model.func
    readout = energy_model.per_atom_energy_readout
    after = "per_atom_energy_readout"
    irreps = dict(readout.irreps_out)
    if noise == "head":
        head = ScalarMLP(
            output_dim=1,
            field=AtomicDataDict.NODE_FEATURES_KEY,
            out_field=PER_ATOM_LOG_SIGMA_KEY,
            irreps_in=readout.irreps_in,
        )
        with torch.no_grad():  # the factor starts at one: every atom at its element's std
            for p in head.parameters():
                p.zero_()
        energy_model.insert("noise_head", head, after=after)
        after = "noise_head"
        irreps.update(head.irreps_out)
    block = ObservationNoise(kwargs["type_names"], force_noise, energy_noise, stress_noise,
                             trainable=noise != "fixed", heteroscedastic=noise == "head", irreps_in=irreps)
    energy_model.insert("observation_noise", block, after=after)
    # declare the new outputs so that equivariance checks and the GraphModel wrapper see them
    for key in (PER_ATOM_LOG_SIGMA_KEY, ENERGY_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY):
        model.irreps_out[key] = block.irreps_out[key]
    if dropout:
        _add_dropout(model.func, dropout)
    return model


def nequip_model_kwargs(config: ModelConfig) -> Dict:
    """The arguments of ``nequip.model.NequIPGNNModel`` (with ``seed`` and ``model_dtype``) that build the energy
    model of ``config``: :func:`build_model` without the observation noise and dropout (what
    :mod:`mlip_uq.export` writes in nequip's own formats)."""
    shifts = config.energy_shifts or {t: 0.0 for t in config.type_names}
    return dict(
        seed=config.seed,
        model_dtype=config.dtype,
        type_names=list(config.type_names),
        r_max=float(config.r_max),
        num_layers=config.num_layers,
        l_max=config.l_max,
        parity=config.parity,
        num_features=config.num_features,
        radial_mlp_depth=config.radial_mlp_depth,
        radial_mlp_width=config.radial_mlp_width,
        num_bessels=config.num_bessels,
        polynomial_cutoff_p=config.polynomial_cutoff_p,
        readout_mlp_hidden_layers_depth=1 if config.readout_hidden_width else 0,
        readout_mlp_hidden_layers_width=config.readout_hidden_width or None,
        avg_num_neighbors=None if config.avg_num_neighbors is None else float(config.avg_num_neighbors),
        per_type_energy_shifts={t: float(v) for t, v in shifts.items()},
        per_type_energy_scales={t: float(config.energy_scale) for t in config.type_names},
    )


def build_model(config: ModelConfig) -> GraphModel:
    """Build the (deterministic) model of ``config``; parameters are initialised from ``config.seed``."""
    return _uq_nequip(**nequip_model_kwargs(config), noise=config.noise, force_noise=config.force_noise,
                      energy_noise=config.energy_noise, stress_noise=config.stress_noise, dropout=config.dropout)


def state_layout(config: ModelConfig) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """``{state-dict name: (shape, trainable)}`` of ``build_model(config)``, in state-dict order; the model is
    built once per configuration (checking a posterior file or listing its parameters builds none)."""
    return {name: (shape, trainable) for name, shape, trainable in _layout(json.dumps(config.to_dict(), sort_keys=True))}


@functools.lru_cache(maxsize=32)
def _layout(config_json: str) -> Tuple[Tuple[str, Tuple[int, ...], bool], ...]:
    model = build_model(ModelConfig.from_dict(json.loads(config_json)))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return tuple((name, tuple(t.shape), name in trainable) for name, t in model.state_dict().items())
