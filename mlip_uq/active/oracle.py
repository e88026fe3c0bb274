"""Reference calculators ("oracles") for active learning: any ASE calculator, with failures classified.

An :class:`Oracle` labels one structure at a time with energy (eV), forces (eV/Å) and, for cells periodic in
all three directions, stress (eV/Å³, Voigt). Every call ends in one of three outcomes:

- ``labelled`` — finite labels were computed;
- ``failed`` — the calculator raised (e.g. ``ase.calculators.calculator.CalculationFailed`` for an SCF that did
  not converge) or returned NaN/inf: the structure is skipped;
- ``rejected`` — the calculator cannot treat this kind of structure at all: an element outside
  ``Oracle.elements`` (checked before any call), or an error of one of ``rejection_errors`` (by default ASE's
  ``CalculatorSetupError`` family, which includes ``InputError``: tblite raises it for elements with Z > 86).
  The active-learning loop remembers the composition and never sends it again.

``oracle_from_config`` builds one from a configuration section: ``{calculator: tblite, method: GFN2-xTB}``
(`tblite <https://github.com/tblite/tblite>`_'s GFN1/GFN2-xTB, a real semi-empirical quantum-chemical method),
or ``{calculator: "package.module:ClassName", <keyword arguments>}`` for any ASE calculator (VASP, GPAW,
Quantum ESPRESSO, ...).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import ase
import numpy as np
from ase.calculators.calculator import Calculator, CalculatorSetupError
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import chemical_symbols

from ..settings import ConfigError, section_mapping, settings_from
from .state import bare_atoms

LABELLED, FAILED, REJECTED = "labelled", "failed", "rejected"


@dataclass
class OracleResult:
    """The outcome of one reference call.

    Attributes:
        outcome: ``labelled``, ``failed`` or ``rejected``.
        seconds: wall time of the call (s); 0 when rejected before calling.
        atoms: with ``outcome == "labelled"``, a copy of the structure (numbers, positions, cell, pbc) whose
            ``SinglePointCalculator`` holds ``energy`` (eV), ``forces`` (N, 3) eV/Å and, for fully periodic
            cells, ``stress`` (6,) eV/Å³; else None.
        message: why the call failed or was rejected ("" when labelled).
        called: False when the structure was rejected without calling the calculator (unsupported element).
    """

    outcome: str
    seconds: float
    atoms: Optional[ase.Atoms] = None
    message: str = ""
    called: bool = True


@dataclass
class Oracle:
    """An ASE calculator used as the reference for active learning.

    Every call gets a fresh calculator from ``make_calculator``: an SCF code reusing its calculator starts from
    the previous wavefunction, which makes the labels depend (within the SCF tolerance; ~1e-4 eV/Å measured
    with tblite) on the order of the calls, so that a resumed run would not reproduce an uninterrupted one.

    Args:
        make_calculator: returns a fresh ASE calculator.
        name: a short description for logs (e.g. ``tblite GFN2-xTB``).
        elements: element symbols the calculator supports; a structure with another element is rejected
            without calling. None: no check.
        rejection_errors: exception types meaning "this structure cannot be treated" (rejected, never retried);
            every other exception is a failure of this one call.
    """

    make_calculator: Callable[[], Calculator]
    name: str = "oracle"
    elements: Optional[Sequence[str]] = None
    rejection_errors: Tuple[Type[BaseException], ...] = (CalculatorSetupError,)

    def label(self, atoms: ase.Atoms) -> OracleResult:
        """Compute the reference labels of ``atoms`` (which is not modified): energy and forces, and the stress of
        a cell periodic in all directions when the calculator implements it.

        Returns:
            The :class:`OracleResult`; exceptions of the calculator are caught and classified, except
            ``KeyboardInterrupt``/``SystemExit``, which propagate.
        """
        copy = bare_atoms(atoms)
        if self.elements is not None:
            unsupported = sorted(set(copy.get_chemical_symbols()) - set(self.elements))
            if unsupported:
                return OracleResult(REJECTED, 0.0, message=f"{self.name} does not support element(s) {unsupported}",
                                    called=False)
        copy.calc = self.make_calculator()
        stress = bool(copy.pbc.all()) and "stress" in copy.calc.implemented_properties
        start = time.perf_counter()
        try:
            labels = {"energy": float(copy.get_potential_energy()), "forces": np.array(copy.get_forces(), dtype=float)}
            if stress:
                labels["stress"] = np.array(copy.get_stress(voigt=True), dtype=float)
        except self.rejection_errors as error:
            return OracleResult(REJECTED, time.perf_counter() - start, message=f"{type(error).__name__}: {error}")
        except Exception as error:  # any calculator error is a failed call; the loop goes on
            return OracleResult(FAILED, time.perf_counter() - start, message=f"{type(error).__name__}: {error}")
        seconds = time.perf_counter() - start
        bad = [name for name, value in labels.items() if not np.isfinite(value).all()]
        if bad:
            return OracleResult(FAILED, seconds, message=f"{self.name} returned NaN or inf in {bad}")
        copy.calc = SinglePointCalculator(copy, **labels)
        return OracleResult(LABELLED, seconds, atoms=copy)


def _tblite_factory(options: Dict) -> Callable[[], Calculator]:
    try:
        from tblite.ase import TBLite
    except ImportError as error:
        raise ValueError("oracle.calculator: tblite is not installed (pip install tblite)") from error
    options = {"verbosity": 0, **options}
    return lambda: TBLite(**options)


def _import_factory(spec: str, options: Dict) -> Callable[[], Calculator]:
    module_name, _, class_name = spec.partition(":")
    if not class_name:
        raise ValueError(f"oracle.calculator {spec!r}: use 'tblite' or 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"oracle.calculator {spec!r} cannot be imported: {error}") from error
    return lambda: cls(**options)


#: Elements GFN1-xTB and GFN2-xTB are parametrised for (H to Rn).
TBLITE_ELEMENTS = tuple(chemical_symbols[1:87])


@dataclass(frozen=True)
class OracleOptions:
    """The ``oracle`` section.

    Args:
        calculator: ``tblite`` or ``package.module:ClassName`` (any ASE calculator).
        elements: element symbols the calculator supports; None: H–Rn for tblite, no check otherwise.
        options: the calculator's keyword arguments, passed as given (for tblite: ``method`` = ``GFN2-xTB`` |
            ``GFN1-xTB``, ``accuracy``, ``max_iterations``, ``electronic_temperature`` in K, ...).
    """

    calculator: str
    elements: Optional[List[str]] = None
    options: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, section: Any) -> "OracleOptions":
        """The options of a section ``{calculator, elements, <keyword arguments of the calculator>}``.

        Raises:
            ConfigError: no calculator, or a ``calculator`` or ``elements`` of the wrong type.
        """
        values = dict(section_mapping(section, "oracle"))
        if not values.get("calculator"):
            raise ConfigError("oracle.calculator is required: 'tblite' or 'package.module:ClassName'")
        named = {key: values.pop(key) for key in ("calculator", "elements") if key in values}
        return settings_from(cls, {**named, "options": values}, "oracle")


def oracle_from_config(section: Any) -> Oracle:
    """An :class:`Oracle` from a configuration section (a mapping, see :class:`OracleOptions`, or the options).

    Raises:
        ConfigError: no calculator (or a mistyped one).
        ValueError: the calculator cannot be imported (tblite not installed, no such class).
    """
    options = section if isinstance(section, OracleOptions) else OracleOptions.from_dict(section)
    spec, elements = options.calculator, options.elements
    if spec == "tblite":
        factory = _tblite_factory(dict(options.options))
        elements = TBLITE_ELEMENTS if elements is None else elements
        name = f"tblite {options.options.get('method', 'GFN2-xTB')}"
    else:
        factory = _import_factory(spec, dict(options.options))
        name = spec
    return Oracle(factory, name=name, elements=elements)
