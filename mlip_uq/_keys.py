"""Field names that mlip_uq adds to nequip's ``AtomicDataDict``.

Each key is a constant with its shape and unit, registered with nequip's key registry at import so that
batching and frame slicing treat it like nequip's own fields (STYLE.md: declared, never bolted on).
"""

from typing import Final

from nequip.data import register_fields

# (num_atoms, 1) | log of the per-atom noise standard deviation of each force component (log eV/Å),
# written by the heteroscedastic noise head
PER_ATOM_LOG_SIGMA_KEY: Final[str] = "atomic_log_sigma"

register_fields(node_fields=[PER_ATOM_LOG_SIGMA_KEY])
