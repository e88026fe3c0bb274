"""The step plan of one SG-MCMC chain segment: phases, temperature, step-size factor and sample indices.

A segment is a first run (burn-in, pre-heat, sampling) or a warm-start continuation (settling at the target
temperature, then sampling); sampling is thinned, or made of cosine cycles whose first part is noise-free. The
plan is a pure function of the step, so a resumed chain follows exactly the plan it was on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Schedule:
    """Phase, temperature, step-size factor and sample index of every step of one chain segment.

    Steps ``[start, burnin_end)``: burn-in (T = 0, preconditioner adapting); ``[burnin_end, preheat_end)``:
    the temperature ramps to its target; ``[preheat_end, sampling_start)``: settling at the target
    temperature (warm starts); from ``sampling_start``: sampling, a sample after every ``thinning``-th step,
    or in cycles of ``cycle_steps`` whose first ``exploration_steps`` are noise-free.

    Example:
        >>> plan = Schedule(start=0, burnin_end=4, preheat_end=6, sampling_start=6, n_samples=2, thinning=3,
        ...                 temperature=1.0)
        >>> [plan.phase(s) for s in (0, 4, 6)], [plan.temperature_at(s) for s in (3, 4, 5, 6)]
        (['burnin', 'preheat', 'sampling'], [0.0, 0.5, 1.0, 1.0])
        >>> [s for s in range(plan.end) if plan.sample_index(s) is not None], plan.end
        ([8, 11], 12)
    """

    start: int
    burnin_end: int
    preheat_end: int
    sampling_start: int
    n_samples: int
    thinning: int
    temperature: float
    cycle_steps: Optional[int] = None
    exploration_steps: int = 0

    @property
    def per_cycle(self) -> int:
        return (self.cycle_steps - self.exploration_steps) // self.thinning

    @property
    def end(self) -> int:
        """The step after the last sample."""
        if self.cycle_steps is None:
            return self.sampling_start + self.n_samples * self.thinning
        cycle, j = divmod(self.n_samples - 1, self.per_cycle)
        return self.sampling_start + cycle * self.cycle_steps + self.exploration_steps + (j + 1) * self.thinning

    def _position(self, step: int) -> int:
        return (step - self.sampling_start) % self.cycle_steps

    def phase(self, step: int) -> str:
        if step < self.burnin_end:
            return "burnin"
        if step < self.preheat_end:
            return "preheat"
        if step < self.sampling_start:
            return "settle"
        if self.cycle_steps is not None and self._position(step) < self.exploration_steps:
            return "exploration"
        return "sampling"

    def temperature_at(self, step: int) -> float:
        phase = self.phase(step)
        if phase in ("burnin", "exploration"):
            return 0.0
        if phase == "preheat":
            return self.temperature * (step - self.burnin_end + 1) / (self.preheat_end - self.burnin_end)
        return self.temperature

    def lr_factor(self, step: int) -> float:
        """1 outside cycles; (1 + cos(π t / cycle_steps)) / 2 at position t of a cycle."""
        if self.cycle_steps is None or step < self.sampling_start:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * self._position(step) / self.cycle_steps))

    def sample_index(self, step: int) -> Optional[int]:
        """The index of the sample taken after ``step`` (0-based), or None when no sample is taken there."""
        if step < self.sampling_start:
            return None
        k = step - self.sampling_start
        if self.cycle_steps is None:
            index = (k + 1) // self.thinning - 1 if (k + 1) % self.thinning == 0 else None
        else:
            cycle, position = divmod(k, self.cycle_steps)
            j = position - self.exploration_steps + 1
            if j <= 0 or j % self.thinning or j // self.thinning > self.per_cycle:
                return None
            index = cycle * self.per_cycle + j // self.thinning - 1
        return index if index is not None and index < self.n_samples else None
