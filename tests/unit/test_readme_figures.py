"""The figures the README quotes equal those of the page they come from (docs/benchmarks.md), so that a rerun of
a benchmark that changes them fails here until the README is updated."""

import re

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
BENCHMARKS = (REPO_ROOT / "docs" / "benchmarks.md").read_text()


def _one(pattern: str, text: str, where: str) -> re.Match:
    matches = list(re.finditer(pattern, text))
    assert len(matches) == 1, f"{where}: expected one match of {pattern!r}, found {len(matches)}"
    return matches[0]


def test_md_step_costs_in_the_readme_are_those_of_the_calculator_benchmark():
    """Partial posterior MD step / one model, without and with ``atom_force_std`` every 10th step, at 96 and 768
    atoms: the README's calculator paragraph against the reading of scripts/bench_calculator.py."""
    benchmark = {}
    for atoms in (96, 768):
        found = _one(rf"- {atoms} atoms, K = (\d+): partial MD step \(energy, mean forces, energy std\) ([\d.]+)x"
                     r"[^\n]*?with `atom_force_std` every 10th step ([\d.]+)x", BENCHMARKS, "docs/benchmarks.md")
        benchmark[atoms] = found.groups()
    readme = _one(r"K = (\d+) posterior's MD step costs ([\d.]+)x \(96 atoms\) / ([\d.]+)x \(768 atoms\) one model,"
                  r"\s+([\d.]+)x / ([\d.]+)x with\s+`atom_force_std` every 10th step", README, "README.md").groups()
    k, step96, step768, uq96, uq768 = readme
    assert (k, step96, uq96) == benchmark[96]
    assert (k, step768, uq768) == benchmark[768]
