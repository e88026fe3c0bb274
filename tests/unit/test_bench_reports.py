"""Every section of docs/benchmarks.md that a ``scripts/bench_*.py`` writes is, byte for byte, what the script's
report renders from its committed JSON under docs/ (what ``--report`` writes), hand-written readings included;
a record without its reading (a new measurement) renders the line that asks for one instead of the old text.

The scripts are imported in-process: their heavy imports (torch, nequip) sit inside the functions that measure, so
no model is built and no benchmark runs.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
DOCS = REPO / "docs"
PAGE = DOCS / "benchmarks.md"

#: (script, its JSON under docs/, the section as (heading, body) from the script's module, the record and the path)
SECTIONS = [
    ("bench_demo", "bench_demo.json", lambda m, record, path: (m.HEADING, m.report(record, path))),
    ("bench_calculator", "bench_calculator_cpu.json",
     lambda m, record, path: (m.GPU_SECTION_TITLE if record["gpu"] else m.SECTION_TITLE, m.report(record, path))),
    ("bench_lammps", "bench_lammps.json", lambda m, record, path: (m.HEADING, m.report(record, path))),
    ("bench_model", "bench_model.json", lambda m, record, path: (m.SECTION_TITLE, m.report(record, path))),
    ("bench_neighbors", "bench_neighbors.json", lambda m, record, path: (m.HEADING, m.report(record, path))),
    ("bench_sgmcmc", "bench_sgmcmc_ethanol_noise_learned.json",
     lambda m, record, path: (m.heading("ethanol", "learned"), m.report(record, path))),
    ("bench_starts", "bench_starts_acac.json",
     lambda m, record, path: (m.HEADING.format(words=record["system"]), m.report(record, path))),
    ("bench_starts", "bench_starts_ethanol.json",
     lambda m, record, path: (m.HEADING.format(words=record["system"]), m.report(record, path))),
    ("bench_starts", "bench_starts_tio2.json",
     lambda m, record, path: (m.HEADING.format(words=record["system"]), m.report(record, path))),
    ("bench_starts", "bench_starts_tio2_composition.json",
     lambda m, record, path: (m.HEADING.format(words=record["system"]), m.report(record, path))),
    ("bench_training", "bench_training.json", lambda m, record, path: (m.HEADING, m.report(record, path))),
]


@pytest.fixture(scope="module")
def scripts(request):
    """Import a bench script (and ``_harness``) from scripts/ by name."""
    import importlib

    sys.path.insert(0, str(SCRIPTS))
    request.addfinalizer(lambda: sys.path.remove(str(SCRIPTS)))
    return importlib.import_module


def render(scripts, script: str, name: str, record=None) -> tuple:
    path = DOCS / name
    record = json.loads(path.read_text()) if record is None else record
    heading, body = dict((s, f) for s, n, f in SECTIONS if n == name)[script](scripts(script), record, path)
    return heading, scripts("_harness").render_section(heading, body)


def test_every_bench_script_and_json_is_covered():
    assert {s for s, _, _ in SECTIONS} == {p.stem for p in SCRIPTS.glob("bench_*.py")}
    assert {n for _, n, _ in SECTIONS} == {p.name for p in DOCS.glob("bench_*.json")}


@pytest.mark.parametrize("script,name", [(s, n) for s, n, _ in SECTIONS], ids=[n for _, n, _ in SECTIONS])
def test_section_is_its_report(scripts, script, name):
    heading, rendered = render(scripts, script, name)
    on_page = scripts("_harness").page_section(PAGE.read_text(), heading)
    assert on_page is not None, f"no section {heading!r} in {PAGE.name}"
    assert on_page == rendered, f"{PAGE.name} differs from `python scripts/{script}.py --report` ({name})"


@pytest.mark.parametrize("script,name", [(s, n) for s, n, _ in SECTIONS
                                         if "reading" in json.loads((DOCS / n).read_text())])
def test_a_new_measurement_does_not_keep_the_old_reading(scripts, script, name):
    record = json.loads((DOCS / name).read_text())
    new = copy.deepcopy(record)
    del new["reading"]
    _, rendered = render(scripts, script, name, new)
    assert record["reading"] not in rendered
    pending = scripts("_harness").reading_pending(DOCS / name)
    # bench_model generates a reading from the numbers where none is written
    assert (pending in rendered) != (script == "bench_model")


def test_study_active_sections_are_their_reports(scripts):
    """docs/active_learning.md's sections that ``scripts/study_active.py`` wrote are what its ``--report`` writes
    from docs/study_active.json (the records transcribed from earlier pages, marked ``source``, excepted)."""
    script, harness = scripts("study_active"), scripts("_harness")
    page = (DOCS / "active_learning.md").read_text()
    written = {k: r for k, r in json.loads(script.RECORDS.read_text()).items() if "source" not in r}
    assert written, "no record written by the script"
    for key, record in written.items():
        system, method = key.split("/")
        heading = script.HEADING.format(system=system, method=method)
        assert harness.page_section(page, heading) == harness.render_section(heading, script.report(record, key)), key


def test_bench_starts_summary_is_its_report(scripts):
    """docs/benchmarks.md's section of issue 34's targets on every system is what ``python
    scripts/bench_starts.py --summary`` writes from the systems' committed records, and it covers every one."""
    script, harness = scripts("bench_starts"), scripts("_harness")
    records = script.summary_records()
    assert set(records) == set(script.SYSTEMS)
    rendered = harness.render_section(script.SUMMARY_HEADING, script.summary(records))
    assert harness.page_section(PAGE.read_text(), script.SUMMARY_HEADING) == rendered


def test_tio2_fullset_section_is_its_report(scripts):
    """docs/tio2_results.md's full-set section is what ``python scripts/tio2_fullset.py --report`` writes."""
    script, harness = scripts("tio2_fullset"), scripts("_harness")
    rendered = harness.render_section(script.HEADING, script.report(json.loads(script.OUT.read_text())))
    assert harness.page_section(script.PAGE.read_text(), script.HEADING) == rendered


def test_the_scripts_import_without_torch():
    names = sorted({s for s, _, _ in SECTIONS} | {"tio2_fullset"})
    code = (f"import sys; sys.path.insert(0, {str(SCRIPTS)!r})\n"
            + "".join(f"import {n}\n" for n in names)
            + "heavy = [m for m in ('torch', 'nequip', 'ase', 'matplotlib') if m in sys.modules]\n"
            + "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
