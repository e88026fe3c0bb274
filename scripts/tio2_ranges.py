"""How far the TiO2 figures of the bundled subset carry: the energy and force ranges of the bundled 1,000-structure
subset against those of the full aenet set, the share of the full set outside the subset's range, and the means
of the published full-set results that docs/tio2_results.md sets beside ours.

docs/tio2_results.md trains and tests on the subset (``configs/tio2_subset_map.yaml``'s data); the published rows
beside ours train and test on the full set (``configs/tio2_map.yaml``'s data). Both are read as their
configurations read them (labels, aenet's isolated-atom energies as references). Per structure: the referenced
energy per atom, (E − Σ_i e_{Z_i}) / N in eV/atom, and the largest absolute force component in eV/Å. A full-set
structure lies outside the subset's range when its referenced energy per atom is below the subset's smallest or
above its largest, or its largest force component is above the subset's largest. Reported for every structure of
the full set and for those that ``configs/tio2_map.yaml``'s filter keeps.

Published rows: the means over runs of the authors' own per-run table (Farris et al. 2025,
``../shared/data/tio2_aenet/published/bayesaenet_uq_metrics_test.csv``; its PROVENANCE.md), per method and data
size, in the units of that table (MAE, RMSE, sharpness in meV/atom here; RMSCE; NLL of the per-atom energy in eV).
The file labels ten deep-ensemble runs; five of those labelled ``big`` have an MAE near 5 meV/atom and the other
five (four ``big``, one ``small``) 22-24 meV/atom, which PROVENANCE.md reads as the small regime: the deep
ensemble is split at an MAE of 10 meV/atom.

    python scripts/tio2_ranges.py

Reads the three files only (a few seconds; the full set from the data cache, ``mlip-uq data fetch tio2_aenet``)
and writes docs/tio2/ranges.json with the date and code version; docs/tio2_results.md quotes it.
"""

import argparse
import csv
from pathlib import Path

import numpy as np
from _harness import REPO, stamped

from mlip_uq.config import load_config
from mlip_uq.data import filter_frames, read_frames, referenced_energy_per_atom
from mlip_uq.files import write_json

SUBSET = REPO / "configs" / "tio2_subset_map.yaml"
FULL = REPO / "configs" / "tio2_map.yaml"
OUT = REPO / "docs" / "tio2" / "ranges.json"
PUBLISHED = REPO.parent / "shared" / "data" / "tio2_aenet" / "published" / "bayesaenet_uq_metrics_test.csv"
DE_SMALL_MAE = 0.010  # eV/atom: the file's deep-ensemble runs above it are the small regime (see the docstring)


def per_structure(config):
    """The configuration's frames (unfiltered), their referenced energies per atom (eV/atom) and largest absolute
    force components (eV/Å)."""
    data = config.data
    frames = read_frames(data.path, keys=data.keys, min_distance=data.min_distance)
    return (frames, *energy_and_force(frames, data.energy_references))


def energy_and_force(frames, references) -> tuple:
    """Per frame: the referenced energy per atom (eV/atom; ``references``: element energies in eV) and the largest
    absolute force component (eV/Å)."""
    energy = referenced_energy_per_atom(frames, references)
    return energy, np.array([np.abs(atoms.get_forces()).max() for atoms in frames])


def ranges(energy, force) -> dict:
    """Count, referenced energy per atom (eV/atom: min, max) and largest force component (eV/Å)."""
    return {"structures": int(len(energy)), "energy_per_atom_eV": [float(energy.min()), float(energy.max())],
            "max_force_component_eV_per_A": float(force.max())}


def outside(energy, force, subset: dict) -> dict:
    """How many structures lie outside the subset's range, by which criterion, and their share (a fraction)."""
    low, high = subset["energy_per_atom_eV"]
    below, above = energy < low, energy > high
    stronger = force > subset["max_force_component_eV_per_A"]
    either = below | above | stronger
    return {"energy_below": int(below.sum()), "energy_above": int(above.sum()), "force_above": int(stronger.sum()),
            "outside": int(either.sum()), "outside_fraction": float(either.mean())}


def published(path: Path = PUBLISHED) -> dict:
    """Means over runs of the published per-run table, per ``method/size`` (``de/full``, ``de/small``, ``lrt/full``,
    ...; ``full`` is the file's ``big``): runs, MAE and RMSE (meV/atom), RMSCE, NLL, sharpness (meV/atom)."""
    groups: dict = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            size = "full" if row["Size"] == "big" else row["Size"]
            if row["Method"] == "de":
                size = "small" if float(row["mae"]) > DE_SMALL_MAE else "full"
            groups.setdefault(f"{row['Method']}/{size}", []).append(row)
    return {name: {"runs": len(rows),
                   **{f"{key}_meV_per_atom": 1000 * float(np.mean([float(r[key]) for r in rows]))
                      for key in ("mae", "rmse", "sharp")},
                   "rmsce": float(np.mean([float(r["rmsce"]) for r in rows])),
                   "nll": float(np.mean([float(r["nll"]) for r in rows]))}
            for name, rows in sorted(groups.items())}


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    subset_config, full_config = load_config(SUBSET), load_config(FULL)
    _, e_sub, f_sub = per_structure(subset_config)
    subset = ranges(e_sub, f_sub)
    frames, e_full, f_full = per_structure(full_config)
    rule = full_config.data.filter
    _, keep = filter_frames(frames, full_config.data.energy_references, rule.max_energy_per_atom, rule.max_force)
    record = stamped({
        "command": "python scripts/tio2_ranges.py",
        "energy_references_eV": full_config.data.energy_references,
        "subset": {"config": SUBSET.name, **subset},
        "full": {"config": FULL.name, **ranges(e_full, f_full), "outside_subset": outside(e_full, f_full, subset)},
        "full_filtered": {"filter": {"max_energy_per_atom_eV": rule.max_energy_per_atom,
                                     "max_force_component_eV_per_A": rule.max_force},
                          **ranges(e_full[keep], f_full[keep]),
                          "outside_subset": outside(e_full[keep], f_full[keep], subset)},
        "published": {"file": "bayesaenet_uq_metrics_test.csv", "means": published()}})
    write_json(record, OUT)
    print(Path(OUT).read_text())


if __name__ == "__main__":
    main()
