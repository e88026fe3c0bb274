"""ASE calculator of a posterior: predictive means as ASE's standard results, standard deviations beside them.

Results: the keys of :mod:`mlip_uq.result_keys` (docs/design.md "Calculator contract"), each constant there with
its shape and unit (eV, Å, eV/Å, eV/Å³; stress in ASE's Voigt order xx, yy, zz, yz, xz, xy): ASE's standard
results as predictive means (``energy``, ``free_energy``, ``energies``, ``forces``, ``stress`` of periodic cells),
their stds beside them (``energy_std``, ``energies_std``, ``forces_std``, ``atom_force_std``, ``stress_std``; the
``_epistemic`` parts ``energy_std_epistemic``, ``forces_std_epistemic``, ``atom_force_std_epistemic``) and, with
``return_samples=True``, each sample's ``energy_samples`` and ``forces_samples``.

What is computed is what ASE asks for (``properties``), for a posterior with a shared trunk
(:class:`~mlip_uq.posterior.predict.SamplePass`): every call gives the means (energy, per-atom energies, forces,
stress of periodic cells; forces and stress from one pull-back of the weighted mean energy) and the energy stds
(``energy_std``, ``energies_std``, ``energy_std_epistemic``, ``energy_samples``: from the K tail passes, no
further pull-back). The per-sample forces and stress, K pull-backs through the trunk, are computed only when a key
of :data:`~mlip_uq.result_keys.FORCE_UNCERTAINTY_PROPERTIES` is asked (``forces_std``, ``atom_force_std``, their
``_epistemic`` parts, ``stress_std``, ``forces_samples``), together with all of those keys. ``results`` holds
what was computed; asking for a missing key later (``get_property``) computes it on the same pass, so nothing is
computed twice for the same positions: an ASE dynamics step (which asks only for ``forces``) costs one pull-back,
and a later ``atom_force_std`` at the same positions K - 1 more (with ``keep_trunk_graph``; without it, a new
evaluation).

Means are weighted over the posterior's samples; a std is sqrt(epistemic + aleatoric variance)
(:mod:`mlip_uq.posterior.predict`), multiplied by the posterior's recalibration factor where it has one
(:mod:`mlip_uq.uq.calibration`; ``calculator.calibration`` says which): energy stds (and ``energies_std``, by the
factor of their structure's energy std) and force stds; ``stress_std`` is left as predicted. The aleatoric part
is each sample's observation noise (:class:`~mlip_uq.model.build.ObservationNoise`: learned with the model by
default), so a predictive std is never below it, even for a single model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

import ase
import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from nequip.data import AtomicDataDict
from nequip.utils.global_state import global_state_initialized, set_global_state

from .data import atoms_to_graph, collate
from .posterior import Posterior, load_posterior
from .posterior.predict import SamplePass, predictive_moments
from .result_keys import (
    ARRAY_KEYS,
    ASE_PROPERTIES,
    ATOM_FORCE_STD,
    ATOM_FORCE_STD_EPISTEMIC,
    ENERGIES,
    ENERGIES_STD,
    ENERGY,
    ENERGY_SAMPLES,
    ENERGY_STD,
    ENERGY_STD_EPISTEMIC,
    FORCE_UNCERTAINTY_PROPERTIES,
    FORCES,
    FORCES_SAMPLES,
    FORCES_STD,
    FORCES_STD_EPISTEMIC,
    FREE_ENERGY,
    INFO_KEYS,
    SAMPLE_PROPERTIES,
    STRESS,
    STRESS_STD,
    UNCERTAINTY_PROPERTIES,
)
from .uq.calibration import describe

log = logging.getLogger(__name__)

#: smallest distance between two atoms (or an atom and a periodic image) the calculator accepts (Å)
MIN_DISTANCE = 0.1


class CollapsedAtomsError(ValueError):
    """Two atoms (or an atom and a periodic image) closer than :data:`MIN_DISTANCE`: the model's forces are not
    defined there (the message names the pairs)."""


class UQCalculator(Calculator):
    """ASE calculator with per-atom uncertainty from a posterior (results: module docstring).

    The neighbour list is built with a cutoff of r_max + ``skin`` and reused, filtered to r_max at each call,
    while no atom has moved by ``skin / 2`` or more since it was built and numbers, cell and pbc are unchanged
    (any change of the cell, as in NPT, rebuilds it). The K samples run as
    :class:`~mlip_uq.posterior.predict.SamplePass` describes: shared trunk once, stochastic tail once per sample,
    pull-backs as the asked keys need (module docstring).

    Args:
        posterior_or_path: a :class:`~mlip_uq.posterior.Posterior` (moved to ``device``) or a posterior file.
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        dtype: ``"float32"`` or ``"float64"`` for the model (default: the posterior's own).
        return_samples: also give ``energy_samples`` (K,) and ``forces_samples`` (K, N, 3).
        skin: neighbour-list skin (Å); 0 rebuilds the list at every call.
        keep_trunk_graph: after a call without force-uncertainty keys, keep the trunk's graph so that such a key
            asked later for the same positions costs K - 1 pull-backs (True, the default), or free it at once
            (False: that later key re-evaluates the model, but the call itself needs less memory and was measured
            25 % faster on a CPU at 768 atoms). :func:`mlip_uq.md.run_md` sets it before each step, True only
            before the steps at which it checks the force uncertainty. A public attribute.
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator`.

    Raises:
        ValueError (from :meth:`calculate`): an element the model does not know (named), NaN/inf positions or
        cell, two atoms closer than :data:`MIN_DISTANCE` (named, as :class:`CollapsedAtomsError`; all before the
        model runs), or
        ``stress``/``stress_std`` asked for a structure without a periodic cell.
    """

    implemented_properties = list(ASE_PROPERTIES + UNCERTAINTY_PROPERTIES)

    def __init__(
        self,
        posterior_or_path: Union[Posterior, str, Path],
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[str] = None,
        return_samples: bool = False,
        skin: float = 0.5,
        keep_trunk_graph: bool = True,
        **kwargs,
    ):
        Calculator.__init__(self, **kwargs)
        if not global_state_initialized():
            set_global_state()  # nequip's models are built under it (nequip's own ASE integration does the same)
        posterior = posterior_or_path
        if not isinstance(posterior, Posterior):
            posterior = load_posterior(posterior_or_path)
        if dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        if skin < 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.posterior = posterior.as_dtype(dtype or posterior.config.dtype).to(device)
        self.dtype = getattr(torch, self.posterior.config.dtype)
        self.skin = float(skin)
        self.return_samples = return_samples
        self.keep_trunk_graph = keep_trunk_graph
        if return_samples:  # an instance list: the class-level one is never changed
            self.implemented_properties = UQCalculator.implemented_properties + list(SAMPLE_PROPERTIES)
        self.calibration = describe(self.posterior.calibration)
        log.info("UQCalculator: %s, K=%d samples, recalibration: %s", self.posterior.method,
                 self.posterior.n_samples, self.calibration)
        self.neighbor_list_builds = 0
        self._reference: Optional[dict] = None
        self._pass: Optional[SamplePass] = None  # the model evaluation of the current positions
        #: cotangents pulled back through the trunk by this calculator so far (K per per-sample evaluation)
        self.pullbacks = 0

    def reset(self):
        Calculator.reset(self)
        self._pass = None

    def _check(self, atoms: ase.Atoms, properties) -> bool:
        """Validate ``atoms`` before the model runs; returns whether the cell is periodic with a volume."""
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(self.posterior.config.type_names))
        if unknown:
            raise ValueError(f"element(s) {unknown} not known to the model (it knows {self.posterior.config.type_names})")
        bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))
        if bad.size:
            raise ValueError(f"NaN or inf in the positions of atom(s) {bad[:10].tolist()}")
        if not np.isfinite(atoms.cell.array).all():
            raise ValueError(f"NaN or inf in the cell {atoms.cell.array.tolist()}")
        periodic = bool(atoms.pbc.any()) and abs(atoms.cell.volume) > 1e-12
        asked = {STRESS, STRESS_STD} & set(properties)
        if asked and not periodic:
            raise ValueError(f"{sorted(asked)} requested for a structure without a periodic cell of non-zero volume "
                             f"(pbc={atoms.pbc.tolist()}, cell volume {atoms.cell.volume:.3g} Å³)")
        return periodic

    def graph(self, atoms: ase.Atoms) -> AtomicDataDict.Type:
        """The batched graph of ``atoms`` as the model reads it at :meth:`calculate`: from the reused neighbour list
        (class docstring), edges within r_max, in the model's dtype, on its device (e.g. to time the model on the
        calculator's own input, ``SamplePass(calc.posterior, calc.graph(atoms))``).

        Elements, NaN/inf and periodicity are checked by :meth:`calculate` before it builds the graph, not here.

        Raises:
            CollapsedAtomsError: two atoms (or an atom and a periodic image) closer than :data:`MIN_DISTANCE` (named).
        """
        ref = self._reference
        stale = (
            ref is None
            or self.skin == 0.0
            or not np.array_equal(ref["numbers"], atoms.numbers)
            or not np.array_equal(ref["cell"], atoms.cell.array)
            or not np.array_equal(ref["pbc"], atoms.pbc)
            or np.max(np.linalg.norm(atoms.positions - ref["positions"], axis=1)) >= self.skin / 2
        )
        if stale:
            graph = atoms_to_graph(atoms, self.posterior.config.type_names, self.posterior.config.r_max + self.skin,
                                   dtype=torch.float64, with_labels=False)
            ref = self._reference = dict(graph=graph, positions=atoms.positions.copy(), cell=atoms.cell.array.copy(),
                                         pbc=atoms.pbc.copy(), numbers=atoms.numbers.copy())
            self.neighbor_list_builds += 1
        graph = dict(ref["graph"])
        pos = torch.as_tensor(atoms.positions, dtype=torch.float64)
        edges, shifts = graph[AtomicDataDict.EDGE_INDEX_KEY], graph[AtomicDataDict.EDGE_CELL_SHIFT_KEY]
        vectors = pos[edges[1]] - pos[edges[0]] + shifts @ graph[AtomicDataDict.CELL_KEY].view(3, 3)
        squared = vectors.square().sum(-1)
        close = torch.nonzero(squared < MIN_DISTANCE**2).view(-1)
        if close.numel():
            pairs = [(int(edges[0, e]), int(edges[1, e]), float(squared[e].sqrt())) for e in close[:10]]
            raise CollapsedAtomsError(f"atoms closer than {MIN_DISTANCE} Å (the model's forces are not defined "
                                      "there): " + ", ".join(f"{i} and {j} at {d:.3g} Å" for i, j, d in pairs))
        keep = squared < self.posterior.config.r_max**2
        graph.update({
            AtomicDataDict.POSITIONS_KEY: pos,
            AtomicDataDict.EDGE_INDEX_KEY: edges[:, keep],
            AtomicDataDict.EDGE_CELL_SHIFT_KEY: shifts[keep],
        })
        graph = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in graph.items()}
        return AtomicDataDict.to_(collate([graph]), self.posterior.device)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Compute ``properties`` for ``atoms`` and what comes with them at no extra cost (module docstring).

        Results already computed for the same atoms are kept; stress only for periodic cells.
        """
        if system_changes:
            self.reset()
        Calculator.calculate(self, atoms, properties, system_changes)
        atoms = self.atoms
        periodic = self._check(atoms, properties)
        per_sample = bool(FORCE_UNCERTAINTY_PROPERTIES & set(properties))
        if self._pass is None or (per_sample and not self._pass.can_pull_back_samples):
            self._pass = SamplePass(self.posterior, self.graph(atoms))
        before = self._pass.pullbacks
        pred = self._pass.predictions(per_sample=per_sample, keep_graph=self.keep_trunk_graph)
        m = predictive_moments(pred).calibrated(self.posterior.calibration)
        self.pullbacks += self._pass.pullbacks - before
        results = {
            ENERGY: float(m.energy[0]),
            FREE_ENERGY: float(m.energy[0]),
            ENERGIES: m.energies,
            FORCES: m.forces,
            ENERGY_STD: float(m.energy_std[0]),
            ENERGIES_STD: m.energies_std,
            ENERGY_STD_EPISTEMIC: float(m.energy_std_epistemic[0]),
        }
        if periodic:
            results[STRESS] = m.stress[0]
        if self.return_samples:
            results[ENERGY_SAMPLES] = m.energy_samples[:, 0]
        if per_sample:
            results.update({FORCES_STD: m.forces_std, ATOM_FORCE_STD: m.atom_force_std,
                            FORCES_STD_EPISTEMIC: m.forces_std_epistemic,
                            ATOM_FORCE_STD_EPISTEMIC: m.atom_force_std_epistemic})
            if periodic:
                results[STRESS_STD] = m.stress_std[0]
            if self.return_samples:
                results[FORCES_SAMPLES] = m.forces_samples
        for key, value in results.items():  # what was computed before for these atoms stays as it was
            self.results.setdefault(key, value)


def uq_to_atoms(atoms: ase.Atoms, compute_missing: bool = True) -> ase.Atoms:
    """Copy the uncertainty results of ``atoms.calc`` (a :class:`UQCalculator`, recalculated if stale) into
    ``atoms.info`` and ``atoms.arrays`` under the same keys, so that ``ase.io.write(..., format="extxyz")`` keeps
    them next to the means the calculator's results give (energy, forces, stress).

    Args:
        atoms: atoms with a :class:`UQCalculator` attached.
        compute_missing: first compute every uncertainty key the calculator implements (one evaluation, with
            per-sample forces); False copies only what the calculator has computed for these atoms (an MD step
            between uncertainty checks has the energy stds only).

    Per structure (``info``, :data:`~mlip_uq.result_keys.INFO_KEYS`): ``energy_std``, ``energy_std_epistemic``,
    ``stress_std``, ``energy_samples``; per atom (``arrays``, :data:`~mlip_uq.result_keys.ARRAY_KEYS`):
    ``energies_std``, ``forces_std``, ``atom_force_std``, ``forces_std_epistemic``, ``atom_force_std_epistemic``,
    and ``forces_samples`` as (N, 3K) (sample k's force on atom i in columns 3k..3k+2; extxyz stores only per-atom
    rows), each where the calculator has it; these keys copied earlier and not computed for the present atoms are
    removed.

    Returns:
        ``atoms`` itself.
    """
    calc = atoms.calc
    if not isinstance(calc, UQCalculator):
        raise ValueError(f"uq_to_atoms needs atoms with a UQCalculator attached, got {type(calc).__name__}")
    calc.get_property(ENERGY, atoms)  # recomputes the means if atoms changed since the last call
    if compute_missing:
        calc.get_property(ATOM_FORCE_STD, atoms)  # with it every other force-uncertainty key
    for key in INFO_KEYS:  # an earlier copy that the calculator has not computed for these atoms goes
        atoms.info.pop(key, None)
        if key in calc.results:
            atoms.info[key] = calc.results[key]
    for key in (*ARRAY_KEYS, FORCES_SAMPLES):
        atoms.arrays.pop(key, None)
    for key in ARRAY_KEYS:
        if key in calc.results:
            atoms.arrays[key] = np.asarray(calc.results[key])
    if FORCES_SAMPLES in calc.results:
        samples = calc.results[FORCES_SAMPLES]
        atoms.arrays[FORCES_SAMPLES] = samples.transpose(1, 0, 2).reshape(len(atoms), -1)
    return atoms
