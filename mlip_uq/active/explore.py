"""Explorers: where candidate structures come from, behind one interface (:class:`Explorer`).

- :class:`MDExplorer` (``explore.kind: md``, :class:`MDOptions`) — MD walkers (:class:`Walker`: one trajectory
  from a starting structure, run with the current posterior through :func:`mlip_uq.md.run_md` in chunks; its
  positions, momenta and steps done are saved with the loop state); the rule is checked along the trajectory.
- :class:`PoolExplorer` (``explore.kind: pool``, :class:`PoolOptions`) — a fixed pool of candidates, ranked in
  batches by :func:`pool_uncertainty` (the posterior's forces, per-atom force std and its epistemic part).

An explorer is given a small :class:`ExploreContext` in :meth:`Explorer.step`, built by the loop for every
step: the rule, getters of the current posterior and its calculator, ``call`` (label through the loop),
``commit`` (journal a decision write-ahead), ``save``, ``timed`` and the calls left in the budget; it knows
nothing else of the loop. It owns its state (the walkers, the pool's progress): :meth:`Explorer.state_dict` is
saved with the loop state (its ``explorer`` entry) at every save and commit, :meth:`Explorer.load_state_dict`
restores it on resume. A new MD option is a field of :class:`MDOptions` (its default is the configuration's)
and, if ``run_md`` takes it, an entry of :meth:`MDOptions.md_kwargs`.
"""

from __future__ import annotations

import copy
import csv
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import ase
import numpy as np
from ase.calculators.calculator import Calculator
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from nequip.data import AtomicDataDict

from ..data import FrameStore, collate
from ..files import atomic_write
from ..md import RECORD_KEYS, run_md
from ..posterior import Posterior
from ..posterior.predict import predict_samples, predictive_moments
from ..result_keys import ATOM_FORCE_STD, FORCES
from ..settings import ConfigError
from ..uq.signals import signal_from_results
from .oracle import FAILED, LABELLED, OracleResult
from .rules import Rule, rule_input
from .sources import SourceOptions
from .state import atoms_from_dict, atoms_to_dict, bare_atoms

log = logging.getLogger(__name__)


@dataclass
class Walker:
    """An MD walker: where it is, how far it has gone.

    Attributes:
        index: walker number (also its seed offset).
        start: the starting structure (JSON form, without momenta).
        atoms: the current structure with momenta (JSON form).
        steps_done: MD steps run so far.
        chunks: MD chunks run so far (each chunk has its own thermostat seed).
        restarts: times the walker was sent back to its start (after a failed reference call or collapsed atoms).
        last_call: the walker step of its last reference call (-1: none yet).
        done: True when its steps are used up or its composition was rejected.
    """

    index: int
    start: Dict
    atoms: Dict
    steps_done: int = 0
    chunks: int = 0
    restarts: int = 0
    last_call: int = -1
    done: bool = False

    @classmethod
    def new(cls, index: int, atoms: ase.Atoms, temperature_K: float, seed: int) -> "Walker":
        walker = cls(index=index, start=atoms_to_dict(bare_atoms(atoms)), atoms={})
        walker.reset(temperature_K, seed)
        return walker

    def reset(self, temperature_K: float, seed: int) -> None:
        """Back to the start with fresh Maxwell–Boltzmann velocities at ``temperature_K`` (zero total momentum),
        drawn from a generator seeded by (``seed``, walker, restart)."""
        atoms = atoms_from_dict(self.start)
        rng = np.random.default_rng([seed, self.index, self.restarts])
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
        Stationary(atoms)
        self.atoms = atoms_to_dict(atoms, momenta=True)

    def current(self) -> ase.Atoms:
        return atoms_from_dict(self.atoms)

    def chunk_seed(self, seed: int) -> int:
        """Thermostat seed of the next chunk: a pure function of (seed, walker, chunk), so that a resumed
        walker repeats exactly the chunk it was killed in."""
        return int(np.random.default_rng([seed, self.index, self.chunks, 1]).integers(2**31))


def pool_uncertainty(posterior: Posterior, graphs: Sequence[AtomicDataDict.Type], batch_size: int = 16
                     ) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
    """Predicted forces and per-atom force std (and its epistemic part) of every graph, batched, with the
    calculator's definitions (:func:`~mlip_uq.posterior.predict.predictive_moments`, recalibrated by the
    posterior's calibration).

    Args:
        posterior: the posterior.
        graphs: unbatched graphs with neighbour lists (no labels needed).
        batch_size: graphs per batch.

    Returns:
        Three lists with one entry per graph: mean forces (N, 3) eV/Å, ``atom_force_std`` (N,) eV/Å and
        ``atom_force_std_epistemic`` (N,) eV/Å.
    """
    forces, stds, epistemic = [], [], []
    for start in range(0, len(graphs), batch_size):
        batch = AtomicDataDict.to_(collate(list(graphs[start : start + batch_size])), posterior.device)
        moments = predictive_moments(predict_samples(posterior, batch)).calibrated(posterior.calibration)
        atom_std, atom_epistemic = moments.atom_force_std, moments.atom_force_std_epistemic
        for f in range(len(moments.n_atoms)):
            atoms = moments.frame == f
            forces.append(moments.forces[atoms])
            stds.append(atom_std[atoms])
            epistemic.append(atom_epistemic[atoms])
    return forces, stds, epistemic


def next_walker(walkers: Sequence[Walker], after: int) -> Optional[Walker]:
    """The first walker not done after walker ``after`` (round robin), or None."""
    n = len(walkers)
    for shift in range(1, n + 1):
        walker = walkers[(after + shift) % n]
        if not walker.done:
            return walker
    return None


@dataclass(frozen=True)
class MDOptions:
    """Options of MD exploration (``explore`` with ``kind: md``).

    Args:
        starts: the walkers' starting structures (``{path, index, n, max_atoms}``; default: the first structure
            of the initial set's file).
        steps: MD steps per walker.
        chunk_steps: MD steps per chunk (the unit of work between two saved states).
        min_gap: at least this many steps between two reference calls of a walker.
        timestep_fs: MD time step (fs).
        temperature_K: thermostat (and initial velocity) temperature (K); a list gives walker i the temperature
            ``temperature_K[i % len(temperature_K)]`` (e.g. ``[600, 1200]``: every other walker hot).
        ensemble: ``langevin``, ``nvt`` or ``nve`` (as :func:`mlip_uq.md.run_md`).
        uq_every: check the force uncertainty, and test the rule, every this many MD steps (from each chunk's
            first step; :func:`mlip_uq.md.run_md`); the steps between checks cost one model's forces. It must
            divide ``chunk_steps``. A ``random`` rule's probability is then per check, not per step.
    """

    starts: SourceOptions = field(default_factory=lambda: SourceOptions(index="0"))
    steps: int = 1000
    chunk_steps: int = 200
    min_gap: int = 10
    timestep_fs: float = 0.5
    temperature_K: Union[float, List[float]] = 300.0
    ensemble: str = "langevin"
    uq_every: int = 1

    def __post_init__(self):
        if self.uq_every < 1 or self.chunk_steps % self.uq_every:
            raise ConfigError(f"explore.uq_every={self.uq_every!r}: expected a positive integer that divides "
                              f"explore.chunk_steps ({self.chunk_steps})")
        temperatures = self.temperatures()
        if not temperatures or any(isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0
                                   for t in temperatures):
            raise ConfigError(f"explore.temperature_K={self.temperature_K!r}: expected a positive number (K) or "
                              f"a non-empty list of them")

    def temperatures(self) -> List[float]:
        """``temperature_K`` as a list (K)."""
        return list(self.temperature_K) if isinstance(self.temperature_K, (list, tuple)) else [self.temperature_K]

    def walker_temperature(self, walker: int) -> float:
        """The thermostat temperature (K) of walker ``walker``."""
        temperatures = self.temperatures()
        return float(temperatures[walker % len(temperatures)])

    def md_kwargs(self, walker: int) -> Dict:
        """The options passed on to :func:`mlip_uq.md.run_md` for every chunk of walker ``walker``."""
        return {"timestep_fs": float(self.timestep_fs), "temperature_K": self.walker_temperature(walker),
                "ensemble": self.ensemble, "uq_every": int(self.uq_every)}


@dataclass(frozen=True)
class PoolOptions:
    """Options of pool exploration (``explore`` with ``kind: pool``).

    Args:
        pool: the candidate structures (``{path, index, n, max_atoms}``; ``path`` required).
        batch: candidates selected (and labelled) per batch.
        batch_size: structures per prediction batch when ranking the pool.
    """

    pool: SourceOptions = field(default_factory=SourceOptions)
    batch: int = 5
    batch_size: int = 16


#: the options class of each ``explore.kind``
EXPLORER_OPTIONS = {"md": MDOptions, "pool": PoolOptions}


@dataclass(frozen=True)
class ExploreContext:
    """What an explorer may use of the loop in one :meth:`Explorer.step` (the loop builds one per step).

    Attributes:
        rule: the loop's rule (:mod:`mlip_uq.active.rules`; its state is saved with the loop state).
        posterior: returns the current posterior (loaded on first use after each update).
        calculator: returns an ASE calculator of the current posterior.
        call: ``call(atoms) -> OracleResult``: label a structure with the reference, through the loop (a call
            counts against the budget; a composition the reference rejected before is not called again).
        commit: ``commit(source, result, **values)``: journal the decision on ``result`` write-ahead (its
            labelled structure, if any, goes into the store; the explorer's :meth:`~Explorer.state_dict` as it
            is now goes into the state); ``source`` names the candidate (e.g. ``md walker 0``), ``values`` are
            the decision log's numbers (``rule``, ``step``, the rule's values).
        save: write the loop state, with the explorer's state as it is now.
        timed: ``with timed():`` adds the block's wall time to the exploration time (the model's predictions).
        calls_left: reference calls left in the exploration budget (None: no limit).
    """

    rule: Rule
    posterior: Callable[[], Posterior]
    calculator: Callable[[], Calculator]
    call: Callable[[ase.Atoms], OracleResult]
    commit: Callable[..., None]
    save: Callable[[], None]
    timed: Callable[[], ContextManager[None]]
    calls_left: Optional[int] = None


class Explorer:
    """Where the loop's candidates come from; it owns its state (:meth:`state_dict`, saved with the loop's).

    Attributes:
        kind: ``md`` or ``pool`` (``explore.kind``).
        frames: the structures the explorer starts from (MD starts, pool candidates).
    """

    kind: str
    frames: List[ase.Atoms]

    def check_rule(self, rule) -> None:
        """Raise a :class:`~mlip_uq.settings.ConfigError` for a rule this explorer cannot use."""

    def state_dict(self) -> Dict:
        """JSON-serialisable state (a copy; saved as the ``explorer`` entry of the loop state)."""
        raise NotImplementedError

    def load_state_dict(self, state: Dict) -> None:
        """Restore :meth:`state_dict` (a resumed run)."""
        raise NotImplementedError

    def resume(self) -> None:
        """Repair what a kill left behind in this explorer's files (after :meth:`load_state_dict`)."""

    def batch_open(self) -> bool:
        """True while a selected batch is still being labelled (updates wait until it is done)."""
        return False

    def stop_reason(self) -> Optional[str]:
        """Why exploration is over (None: it goes on)."""
        raise NotImplementedError

    def step(self, context: ExploreContext) -> Optional[str]:
        """Explore until one decision is committed or the explorer's state has advanced (and is saved).

        Returns:
            Why exploration is over when the step found that out (the loop records it), else None.
        """
        raise NotImplementedError


class MDExplorer(Explorer):
    """MD walkers, one chunk per step, round robin; a structure where the rule fires is labelled and the walker
    goes on from it (a failed reference call, or a chunk whose dynamics collapse two atoms, sends the walker back
    to its start with fresh velocities).

    State (:meth:`state_dict`): ``walkers`` (:class:`Walker` fields), ``current_walker`` (the walker of the last
    chunk, -1: none yet) and ``md_steps`` (MD steps run by all walkers).

    Args:
        options: the MD options.
        starts: the walkers' starting structures.
        seed: the loop's seed (velocities, thermostat).
        out: the loop's output folder (traces in ``md/walker<i>.csv``).
    """

    kind = "md"

    def __init__(self, options: MDOptions, starts: List[ase.Atoms], seed: int, out: Path):
        self.options, self.frames, self.seed, self.out = options, starts, seed, Path(out)
        self.walkers = [Walker.new(i, a, options.walker_temperature(i), seed) for i, a in enumerate(starts)]
        self.current_walker, self.md_steps = -1, 0

    def check_rule(self, rule) -> None:
        if rule.kind == "top_k":
            raise ConfigError("rule top_k ranks a candidate pool; with explore.kind md use force_std, calibrated "
                              "or random")
        if rule.kind == "random" and rule.probability is None:
            raise ConfigError("rule random during MD needs rule.probability (the chance of a call per MD step)")
        if rule.kind == "interval" and (rule.every % self.options.uq_every or rule.every < self.options.min_gap):
            raise ConfigError(f"rule.every={rule.every}: expected a multiple of explore.uq_every "
                              f"({self.options.uq_every}) and at least explore.min_gap ({self.options.min_gap})")

    def state_dict(self) -> Dict:
        return {"walkers": [asdict(w) for w in self.walkers], "current_walker": self.current_walker,
                "md_steps": self.md_steps}

    def load_state_dict(self, state: Dict) -> None:
        self.walkers = [Walker(**copy.deepcopy(w)) for w in state["walkers"]]
        self.current_walker, self.md_steps = int(state["current_walker"]), int(state["md_steps"])

    def stop_reason(self) -> Optional[str]:
        return "every MD walker finished its steps" if all(w.done for w in self.walkers) else None

    def step(self, context: ExploreContext) -> Optional[str]:
        """Run one chunk of the next walker; label the structure where the rule fires."""
        rule, options = context.rule, self.options
        walker = next_walker(self.walkers, self.current_walker)
        self.current_walker = walker.index
        total = int(options.steps)
        steps = min(int(options.chunk_steps), total - walker.steps_done)
        atoms = walker.current()
        before, min_gap = walker.steps_done, int(options.min_gap)
        fired: Dict = {}

        def on_uncertain(step, current, record):
            # not the chunk's starting structure (labelled already, or checked at the end of the last chunk), and
            # not within min_gap steps of the walker's last call (consecutive MD frames are nearly the same)
            if step == 0 or (walker.last_call >= 0 and before + step - walker.last_call < min_gap):
                return False
            if not rule.due(before + step):  # a clock rule's steps
                return False
            results = current.calc.results
            fired.update(step=int(step), atoms=atoms_to_dict(current, momenta=True),
                         forces=np.array(results[FORCES]), std=np.array(results[ATOM_FORCE_STD]),
                         signal=signal_from_results(results, rule.signal))
            return True

        with context.timed():
            result = run_md(atoms, context.calculator(), steps=steps, out_dir=None, stop_rule=rule,
                            on_uncertain=on_uncertain, seed=walker.chunk_seed(self.seed), progress=False,
                            **options.md_kwargs(walker.index))
        walker.chunks += 1
        done = fired["step"] if fired else result.steps_done
        self._append_trace(self._trace_path(walker.index),
                           [{**r, "step": before + r["step"]} for r in result.records if 0 < r["step"] <= done])
        walker.steps_done += done
        self.md_steps += done
        if not fired:
            if result.collapsed:  # the current model's dynamics broke the structure: back to the start
                log.info("explore md walker %d: %s; back to its start", walker.index, result.stop_reason)
                walker.restarts += 1
                walker.reset(options.walker_temperature(walker.index), self.seed)
            else:
                walker.atoms = atoms_to_dict(atoms, momenta=True)
            walker.done = walker.steps_done >= total
            context.save()
            return None
        current = atoms_from_dict(fired["atoms"])
        values = {"rule": rule.kind, "step": walker.steps_done, "md_steps": self.md_steps,
                  **rule.values(fired["signal"], fired["forces"])}
        labelled = context.call(current)
        walker.last_call = walker.steps_done
        if labelled.outcome == LABELLED:
            rule.observe(fired["forces"], labelled.atoms.get_forces(), fired["std"])
            walker.atoms = fired["atoms"]  # go on from the labelled structure, with the updated model
        elif labelled.outcome == FAILED:
            walker.restarts += 1  # a structure the reference cannot converge: back to the start
            walker.reset(options.walker_temperature(walker.index), self.seed)
        else:
            walker.done = True  # every structure of this walker has the rejected composition
        walker.done = walker.done or walker.steps_done >= total
        context.commit(f"md walker {walker.index}", labelled, **values)
        return None

    def resume(self) -> None:
        """Drop trace rows beyond the saved walker states (written by a chunk that a kill cut short)."""
        for walker in self.walkers:
            path = self._trace_path(walker.index)
            if path.is_file():
                with open(path, newline="") as handle:
                    rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= walker.steps_done]
                with atomic_write(path) as tmp:
                    tmp.unlink()
                    self._append_trace(tmp, rows)

    def _trace_path(self, walker: int) -> Path:
        return self.out / "md" / f"walker{walker}.csv"

    @staticmethod
    def _append_trace(path: Path, rows: List[Dict]) -> None:
        """Add MD records (steps counted along the walker) to a walker's trace CSV."""
        path.parent.mkdir(exist_ok=True)
        new = not path.is_file()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, RECORD_KEYS)
            if new:
                writer.writeheader()
            writer.writerows(rows)


class PoolExplorer(Explorer):
    """A pool of candidates: the rule selects a batch by the current posterior's uncertainty, the batch is
    labelled one candidate per step, then the posterior is updated and the next batch selected.

    State (:meth:`state_dict`): ``used`` (candidates labelled), ``batch`` (the selected batch still to label)
    and ``round`` (batches selected).

    Args:
        options: the pool options.
        frames: the candidate structures.
        indices: their positions in the selection read from the pool file (named in the decision log).
        out: the loop's output folder (``pool.h5``: the candidates' neighbour lists).
        type_names: element names; ``r_max``: cutoff (Å); ``dtype``: the model's dtype.
    """

    kind = "pool"

    def __init__(self, options: PoolOptions, frames: List[ase.Atoms], indices: List[int], out: Path,
                 type_names: List[str], r_max: float, dtype):
        self.options, self.frames, self.indices, self.out = options, frames, indices, Path(out)
        self.type_names, self.r_max, self.dtype = type_names, r_max, dtype
        self.used: List[int] = []
        self.batch: List[int] = []
        self.round = 0
        self._graphs: Optional[List] = None

    def check_rule(self, rule) -> None:
        if rule.kind == "interval":
            raise ConfigError("rule interval relabels every n MD steps; with explore.kind pool use top_k, "
                              "force_std, calibrated or random")

    def state_dict(self) -> Dict:
        return {"used": list(self.used), "batch": list(self.batch), "round": self.round}

    def load_state_dict(self, state: Dict) -> None:
        self.used, self.batch = [int(i) for i in state["used"]], [int(i) for i in state["batch"]]
        self.round = int(state["round"])

    def batch_open(self) -> bool:
        return bool(self.batch)

    def stop_reason(self) -> Optional[str]:
        return "pool exhausted" if not self.batch and len(self.used) >= len(self.frames) else None

    def graphs(self) -> List:
        """The candidates' graphs (``pool.h5``, built once)."""
        if self._graphs is None:
            store = FrameStore.for_frames(self.out / "pool.h5", self.frames, self.type_names, self.r_max,
                                          source=self.options.pool.path)
            self._graphs = store.graphs(dtype=self.dtype)
        return self._graphs

    def step(self, context: ExploreContext) -> Optional[str]:
        """Select a batch from the pool (when none is pending), then label its next candidate."""
        rule = context.rule
        if not self.batch:
            used = set(self.used)
            remaining = [i for i in range(len(self.frames)) if i not in used]
            k = int(self.options.batch)
            if context.calls_left is not None:
                k = min(k, context.calls_left)
            graphs = self.graphs()
            with context.timed():
                forces, stds, epistemic = pool_uncertainty(context.posterior(), [graphs[i] for i in remaining],
                                                           int(self.options.batch_size))
            picks = rule.select([rule_input(rule, *pair) for pair in zip(stds, epistemic)], forces, k)
            if not picks:
                return "no pool candidate fires the rule"
            self.batch = [remaining[j] for j in picks]
            self.round += 1
            context.save()
        i = self.batch[0]
        with context.timed():
            forces, stds, epistemic = pool_uncertainty(context.posterior(), [self.graphs()[i]])
        values = {"rule": rule.kind, "step": self.round,
                  **rule.values(rule_input(rule, stds[0], epistemic[0]), forces[0])}
        result = context.call(self.frames[i])
        if result.outcome == LABELLED:
            rule.observe(forces[0], result.atoms.get_forces(), stds[0])
        self.used.append(i)
        self.batch.pop(0)
        context.commit(f"pool[{self.indices[i]}]", result, **values)
        return None
