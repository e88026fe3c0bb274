"""Shared pieces of the benchmark scripts: the docs/benchmarks.md section writer, the record of a run's numbers
(its JSON under docs/, the code version, the provenance line of its table, its reading), the benchmarked TiO2
system, timing rounds in rotating order, the memory probe and the machine description.

The scripts import it as ``_harness`` (they run from ``scripts/``, whose folder Python puts on ``sys.path``).
It imports only the standard library and numpy, and every ``scripts/bench_*.py`` keeps its heavy imports (torch,
nequip, ``mlip_uq`` modules that import torch) inside the functions that measure, so that a script's ``report``
(the section rendered from its JSON alone, what ``--report`` writes) can be imported and run in a fraction of a
second (``tests/unit/test_bench_reports.py`` checks every section of docs/benchmarks.md against it).

**Readings.** A section's reading (what its numbers mean, in words) is either generated from the numbers by the
script's report, or written by hand. A hand-written reading is stored in the section's JSON under ``"reading"``
(:data:`READING`), in the record of the measurement it reads, as markdown exactly as it stands on the page, and
the report renders it where it stands (:func:`reading`). A new measurement (a run without ``--report``) builds a
new record, which has no reading, whether or not its numbers came out the same: the old reading is never carried
over, and the section says in its place that the reading of this run is still to be written
(:func:`reading_pending`; a report with a generated reading renders that instead). Whoever writes it puts it
under ``"reading"`` in the JSON and runs the script with ``--report``.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import resource
import subprocess
from datetime import date
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_FILE = REPO / "data" / "tio2_aenet_subset_1000.extxyz"
RATTLE_STDEV = 0.01  # Å, the displacement of the benchmark cells' atoms
T = TypeVar("T")
READING = "reading"  # the key of a record's hand-written reading (module docstring)
#: the benchmarked architecture (:func:`model_config`), as plain values for the reports
MODEL = dict(
    type_names=["O", "Ti"],
    r_max=5.0,
    num_layers=3,
    l_max=1,
    num_features=32,
    avg_num_neighbors=50.0,  # ≈ the mean number of neighbours within 5 Å in these cells
    energy_shifts={"O": -432.5, "Ti": -1604.6},  # eV, close to the aenet set's per-element energies
)


def update_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the markdown section starting at ``heading`` up to the next ``## `` heading."""
    from mlip_uq.files import atomic_write  # imports torch: only when a section is written

    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    section = render_section(heading, body)
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def render_section(heading: str, body: str) -> str:
    """The section as :func:`update_section` writes it: ``heading``, a blank line, ``body`` stripped, a newline."""
    return f"{heading}\n\n{body.strip()}\n"


def page_section(text: str, heading: str) -> Optional[str]:
    """The section of the page ``text`` that starts at ``heading``, up to (without) the newline before the next
    ``## `` heading, as :func:`update_section` would replace it; None when the page has no such heading."""
    start = text.find(heading)
    if start < 0:
        return None
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def stored_reading(record: dict) -> Optional[str]:
    """The record's hand-written reading (markdown, exactly as on the page), None when it has none."""
    return record.get(READING)


def reading_pending(path: Path) -> str:
    """The line that stands in for the hand-written reading of a new measurement (module docstring)."""
    return (f"**Reading:** not yet written for this run. Its numbers are new; the reading of the earlier run was "
            f"not carried over. Write it under `\"{READING}\"` in [{path.name}]({path.name}) and run the script "
            "with `--report`.")


def reading(record: dict, path: Path, generated: Optional[Callable[[], str]] = None) -> str:
    """The reading of the record's numbers: its hand-written one (:func:`stored_reading`), else ``generated()``
    where the script generates one from the numbers, else the line saying it is still to be written."""
    text = stored_reading(record)
    if text is not None:
        return text
    return generated() if generated is not None else reading_pending(path)


def code_version() -> str:
    """The checkout's short commit (``git rev-parse --short HEAD``), ``+dirty`` when tracked files differ from it."""
    git = ["git", "-C", str(REPO)]
    version = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["diff", "--quiet", "HEAD"]).returncode != 0
    return version + ("+dirty" if dirty else "")


def stamped(values: dict) -> dict:
    """A new record of a script's numbers: ``values`` after the measurement's date and code version (keys
    ``date``, ``code_version``), to be written to the script's JSON under docs/."""
    return {"date": date.today().isoformat(), "code_version": code_version(), **values}


def provenance(record: dict, path: Path) -> str:
    """The line under a table that says where its numbers are: the code version they were measured with and the
    JSON file (linked relative to docs/); for numbers transcribed once from an earlier page (the record's
    ``source``), that they are not regenerated from a run and which command would; for numbers that predate a
    change which makes them incomparable with later sections (``stale``), which change."""
    line = f"Code version: {record['code_version']}. Numbers: [{path.name}]({path.name})."
    if "source" in record:
        line += f" **Not regenerated from a run:** {record['source']}."
    if "stale" in record:
        line = f"**Stale:** {record['stale']}. " + line
    return line


def model_config(dtype: str):
    """The benchmarked architecture: a representative TiO2 model (165k parameters)."""
    from mlip_uq.model import ModelConfig

    return ModelConfig(**copy.deepcopy(MODEL), dtype=dtype)


def make_cell(reps: Tuple[int, int, int], seed: int = 0):
    """The first bundled TiO2 frame (24 atoms) repeated ``reps`` times and rattled by ``RATTLE_STDEV`` Å."""
    import ase.io

    base = ase.io.read(DATA_FILE, index=0)
    base.calc = None
    atoms = base.repeat(reps)
    atoms.rattle(stdev=RATTLE_STDEV, seed=seed)
    return atoms


def status_kib(key: str) -> Optional[int]:
    """A ``kB`` field of /proc/self/status (``VmRSS``: resident set now, ``VmHWM``: its peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark ``VmHWM`` to the current RSS (write 5 to /proc/self/clear_refs, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rotating_rounds(paths: Sequence[str], call: Callable[[str], T], n_rounds: int) -> Iterator[Dict[str, T]]:
    """``n_rounds`` timing rounds of ``call(path)`` for every path, the order rotating from round to round so
    that no path always runs first; yields each round's results by path as soon as the round is done."""
    for r in range(n_rounds):
        order = list(paths[r % len(paths):]) + list(paths[: r % len(paths)])
        yield {path: call(path) for path in order}


def peak_rss_growth_mib(call: Callable[[], object]) -> float:
    """Peak resident-set growth (MiB) of this process during ``call()`` over the resting state before it.

    The kernel's peak-RSS mark is reset to the current RSS first, so that the peak after the call (``VmHWM``)
    minus the RSS before it (``VmRSS``) is the call's own peak working set. ``getrusage(RUSAGE_SELF).ru_maxrss``
    cannot be used after such a reset: the kernel folds in the peak recorded whenever a thread exits. Without
    /proc, the ``ru_maxrss`` delta is returned, which reads 0 when the call needs less than earlier peaks.
    """
    gc.collect()
    if reset_peak_rss() and status_kib("VmHWM") is not None:
        before = status_kib("VmRSS")
        call()
        after = status_kib("VmHWM")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0  # both in KiB on Linux


def machine() -> Dict[str, str]:
    """Processor count and model, Python and library versions, transparent huge pages: the table header."""
    import e3nn
    import nequip
    import torch
    import vesin

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "unknown"
    return {
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nequip": nequip.__version__,
        "e3nn": e3nn.__version__,
        "vesin": getattr(vesin, "__version__", "?"),
        "thp": thp,
    }


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, e.g. ``1.2 / 0.9 / 0.7``."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def machine_busy(threads: int) -> bool:
    """Whether other jobs were running: a 1-minute load average clearly above this benchmark's own threads."""
    return os.getloadavg()[0] > threads + 0.75


def fmt(x: Optional[float], digits: int = 1) -> str:
    """``x`` with thousands separators and ``digits`` decimals; a dash for None or a non-finite value."""
    return "–" if x is None or not np.isfinite(x) else f"{x:,.{digits}f}"
