"""Field names that mlip_uq adds to nequip's ``AtomicDataDict``.

Each key is a constant with its shape and unit, registered with nequip's key registry at import so that
batching and frame slicing treat it like nequip's own fields (STYLE.md: declared, never bolted on).
"""

from typing import Final

from nequip.data import register_fields

# The observation noise of the Gaussian likelihood, written by the model's observation-noise block
# (mlip_uq.model.build.ObservationNoise):
# (num_atoms, 1) | log of atom i's noise std of each of its force components (log eV/Å)
PER_ATOM_LOG_SIGMA_KEY: Final[str] = "atomic_log_sigma"
# (num_frames, 1) | log of a frame's noise std of its energy per atom (log eV/atom)
ENERGY_LOG_SIGMA_KEY: Final[str] = "energy_per_atom_log_sigma"
# (num_frames, 1) | log of a frame's noise std of each stress component (log eV/Å³)
STRESS_LOG_SIGMA_KEY: Final[str] = "stress_log_sigma"

register_fields(node_fields=[PER_ATOM_LOG_SIGMA_KEY], graph_fields=[ENERGY_LOG_SIGMA_KEY, STRESS_LOG_SIGMA_KEY])
