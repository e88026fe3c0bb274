"""The result keys of :class:`~mlip_uq.calculator.UQCalculator`: every key it writes into ``calc.results`` (and
:func:`~mlip_uq.calculator.uq_to_atoms` into ``atoms.info`` / ``atoms.arrays``), each a named constant with its
shape and unit, defined once here; the modules that read a result back use these constants, never a literal.

N is the number of atoms, K the number of posterior samples. Units: eV, Å, eV/Å, eV/Å³; stress in ASE's Voigt
order xx, yy, zz, yz, xz, xy. A std is the predictive standard deviation sqrt(epistemic + aleatoric variance)
(:mod:`mlip_uq.posterior.predict`), recalibrated where the posterior carries a calibration
(:mod:`mlip_uq.uq.calibration`; ``stress_std`` is left as predicted); an ``_epistemic`` key is the spread of the
samples alone (recalibrated by the same factor as its total). A new key is added here, to one of the groups
below, and written by the calculator (``tests/unit/test_result_keys.py`` checks that the two agree).

This module imports nothing of mlip_uq (any module may import it).
"""

from typing import Final, FrozenSet, Tuple

# ASE's standard results: the predictive means
#: () | predictive mean of the total energy (eV)
ENERGY: Final[str] = "energy"
#: () | the same value as :data:`ENERGY` (ASE's force-consistent energy) (eV)
FREE_ENERGY: Final[str] = "free_energy"
#: (N,) | mean per-atom energy contributions (eV)
ENERGIES: Final[str] = "energies"
#: (N, 3) | mean forces (eV/Å)
FORCES: Final[str] = "forces"
#: (6,) | mean stress (eV/Å³), periodic cells only
STRESS: Final[str] = "stress"

# The uncertainties: standard deviations in the unit of their quantity
#: () | total-energy predictive std (eV), epistemic + aleatoric
ENERGY_STD: Final[str] = "energy_std"
#: (N,) | std of each atom's energy contribution (eV), epistemic only (per-atom energies are not observed)
ENERGIES_STD: Final[str] = "energies_std"
#: (N, 3) | std of each force component (eV/Å), epistemic + aleatoric
FORCES_STD: Final[str] = "forces_std"
#: (N,) | per-atom force std: sqrt of the sum of the atom's three force-component variances (eV/Å)
ATOM_FORCE_STD: Final[str] = "atom_force_std"
#: (6,) | std of each stress component (eV/Å³), epistemic + aleatoric, periodic cells only
STRESS_STD: Final[str] = "stress_std"
#: () | the sample-spread part of :data:`ENERGY_STD` alone (eV)
ENERGY_STD_EPISTEMIC: Final[str] = "energy_std_epistemic"
#: (N, 3) | the sample-spread part of :data:`FORCES_STD` alone (eV/Å)
FORCES_STD_EPISTEMIC: Final[str] = "forces_std_epistemic"
#: (N,) | the sample-spread part of :data:`ATOM_FORCE_STD` alone (eV/Å)
ATOM_FORCE_STD_EPISTEMIC: Final[str] = "atom_force_std_epistemic"

# The samples themselves, only from a calculator made with ``return_samples=True``
#: (K,) | each sample's total energy (eV)
ENERGY_SAMPLES: Final[str] = "energy_samples"
#: (K, N, 3) | each sample's forces (eV/Å); in ``atoms.arrays`` (:func:`~mlip_uq.calculator.uq_to_atoms`) as
#: (N, 3K), sample k's force on atom i in columns 3k..3k+2
FORCES_SAMPLES: Final[str] = "forces_samples"

#: ASE's standard results, the means
ASE_PROPERTIES: Final[Tuple[str, ...]] = (ENERGY, FREE_ENERGY, ENERGIES, FORCES, STRESS)
#: the standard deviations
UNCERTAINTY_PROPERTIES: Final[Tuple[str, ...]] = (
    ENERGY_STD, ENERGIES_STD, FORCES_STD, ATOM_FORCE_STD, STRESS_STD,
    ENERGY_STD_EPISTEMIC, FORCES_STD_EPISTEMIC, ATOM_FORCE_STD_EPISTEMIC,
)
#: the per-sample values (``return_samples=True``)
SAMPLE_PROPERTIES: Final[Tuple[str, ...]] = (ENERGY_SAMPLES, FORCES_SAMPLES)
#: every result key
ALL_PROPERTIES: Final[Tuple[str, ...]] = ASE_PROPERTIES + UNCERTAINTY_PROPERTIES + SAMPLE_PROPERTIES
#: keys that need each sample's forces (K pull-backs through the trunk); the others need one pull-back in all
FORCE_UNCERTAINTY_PROPERTIES: Final[FrozenSet[str]] = frozenset({
    FORCES_STD, ATOM_FORCE_STD, FORCES_STD_EPISTEMIC, ATOM_FORCE_STD_EPISTEMIC, STRESS_STD, FORCES_SAMPLES,
})
#: keys that :func:`~mlip_uq.calculator.uq_to_atoms` copies into ``atoms.info`` (one value per structure)
INFO_KEYS: Final[Tuple[str, ...]] = (ENERGY_STD, ENERGY_STD_EPISTEMIC, STRESS_STD, ENERGY_SAMPLES)
#: keys that :func:`~mlip_uq.calculator.uq_to_atoms` copies into ``atoms.arrays`` (one row per atom), besides
#: :data:`FORCES_SAMPLES` (reshaped)
ARRAY_KEYS: Final[Tuple[str, ...]] = (ENERGIES_STD, FORCES_STD, ATOM_FORCE_STD, FORCES_STD_EPISTEMIC,
                                      ATOM_FORCE_STD_EPISTEMIC)
