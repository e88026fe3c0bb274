"""Every figure the README quotes from a benchmark or a study equals the committed JSON it was measured into
(``docs/*.json``), and the TiO2 page's data ranges and published rows equal ``docs/tio2/ranges.json`` and its
summary of the full-set evaluation ``docs/tio2/fullset.json``: a rerun that changes a number fails here until the
text is updated.

A quoted figure matches when the JSON's value, in the text's unit and rounded to the text's decimals, reads the
same (``34`` for 34.2, ``−1.5`` for −1.52); a failure names the text's line, the JSON file and its key.
"""

import json
import re
import statistics

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
TIO2_PAGE = REPO_ROOT / "docs" / "tio2_results.md"


def _json(name: str) -> dict:
    return json.loads((REPO_ROOT / "docs" / name).read_text())


def _match(path, pattern: str):
    """The text of the file at ``path`` and the one match of ``pattern`` in it."""
    text = path.read_text()
    matches = list(re.finditer(pattern, text))
    assert len(matches) == 1, f"{path.name}: expected one match of {pattern!r}, found {len(matches)}"
    return text, matches[0]


def _reads_as(quoted: str, value: float) -> bool:
    """Whether ``value`` rounded to the decimals of ``quoted`` (thousands separators, a Unicode minus, a plus sign
    allowed) is ``quoted``."""
    text = quoted.replace(",", "").replace("−", "-").lstrip("+")
    decimals = len(text.partition(".")[2])
    return f"{value:.{decimals}f}" == text


class Figures:
    """Collects the mismatches of one text against its JSON sources and reports them all at once."""

    def __init__(self, path, pattern: str):
        self.name = path.name
        self.text, self.match = _match(path, pattern)
        self.failures = []

    def line(self, offset: int) -> int:
        """The line of the file at character ``offset``."""
        return self.text.count("\n", 0, offset) + 1

    def check(self, index: int, source: str, key: str, value: float) -> None:
        """Group ``index`` of the match is ``value``, found in ``source`` (a docs/ JSON file) under ``key``."""
        quoted, where = self.match.group(index + 1), self.line(self.match.start(index + 1))
        if not _reads_as(quoted, value):
            self.failures.append(f"{self.name} line {where}: {quoted!r} is not {source} {key} = {value!r}")

    def require(self, ok: bool, what: str, source: str, key: str) -> None:
        """A claim of the text in words (e.g. 'never beats random') that ``source`` under ``key`` must bear out."""
        if not ok:
            where = self.line(self.match.start())
            self.failures.append(f"{self.name} line {where}: {what!r} does not hold in {source} {key}")

    def assert_ok(self) -> None:
        assert not self.failures, "\n".join(self.failures)


def test_md_step_costs_are_those_of_the_calculator_benchmark():
    """Partial posterior MD step / one model, without and with ``atom_force_std`` every 10th step, at 96 and 768
    atoms: scripts/bench_calculator.py's numbers."""
    source = "bench_calculator_cpu.json"
    record = _json(source)
    rows = {r["atoms"]: r for r in record["rows"]}
    f = Figures(README, r"K = (\d+) posterior's MD step costs ([\d.]+)x \(96 atoms\) / ([\d.]+)x \(768 atoms\) "
                        r"one model,\s+([\d.]+)x / ([\d.]+)x with\s+`atom_force_std` every (\d+)th step")
    f.check(5, source, "uq_every", record["uq_every"])
    for index, atoms, ratio in ((1, 96, "partial_step/nequip_one"), (2, 768, "partial_step/nequip_one"),
                                (3, 96, "amortised/nequip_one"), (4, 768, "amortised/nequip_one")):
        f.check(0, source, f"rows[atoms={atoms}].k", rows[atoms]["k"])
        f.check(index, source, f"rows[atoms={atoms}].ratios[{ratio}]", rows[atoms]["ratios"][ratio])
    f.assert_ok()


def test_noise_figures_are_those_of_the_ethanol_map_run():
    """The learned noise against the test error, and the held-out noise fit's NLL and miscalibration."""
    source = "map_accuracy.json"
    run = _json(source)["ethanol50"]
    trained, fitted = (run["held_out_noise"][k] for k in ("noise as trained (training errors)",
                                                            "noise fitted on the validation split"))
    f = Figures(README, r"rMD17 ethanol, 50 structures: a learned force std of ([\d.]+) meV/Å against a test "
                        r"RMSE of\s+(\d+) meV/Å\)[\s\S]*?raw test force NLL goes\s+from (\d+) to (−[\d.]+) and the "
                        r"force miscalibration area from ([\d.]+) to ([\d.]+) \(docs/benchmarks.md\)")
    f.check(0, source, "ethanol50.held_out_noise[as trained].forces_std_mean_mev_per_a",
            trained["forces_std_mean_mev_per_a"])
    f.check(1, source, "ethanol50.forces_rmse_mev_per_a", run["forces_rmse_mev_per_a"])
    f.check(2, source, "ethanol50.held_out_noise[as trained].forces_nll", trained["forces_nll"])
    f.check(3, source, "ethanol50.held_out_noise[fitted].forces_nll", fitted["forces_nll"])
    f.check(4, source, "ethanol50.held_out_noise[as trained].forces_miscal_area", trained["forces_miscal_area"])
    f.check(5, source, "ethanol50.held_out_noise[fitted].forces_miscal_area", fitted["forces_miscal_area"])
    f.assert_ok()


def test_active_learning_figures_are_those_of_the_pool_studies():
    """The rare-event pool (its share), the calls top-k needs to reach random's final error (ensemble, several-start
    recipe per seed), and the protocols on which no rule beat random."""
    source = "study_active.json"
    studies = _json(source)
    ensemble, recipe = studies["acac_torsion/ensemble"], studies["acac_torsion/sgmcmc_starts"]
    f = Figures(README, r"C–C bond, (\d+) % of a\s+pool of 300 K MD frames,[^)]*\),\s+top-k selection with a deep "
                        r"ensemble, and with the several-start SG-MCMC recipe ranking by the epistemic std,\s+reaches "
                        r"random selection's (\d+)-call test force error with (\d+) calls \(the recipe: (\d+), (\d+) "
                        r"and (\d+) calls on its (\d+) seeds\)")
    pool = ensemble["pool"]
    f.check(0, source, "acac_torsion/ensemble.pool (scan share, %)",
            100 * pool["dihedral_scan"] / (pool["md_300K"] + pool["dihedral_scan"]))
    for key, study in (("acac_torsion/ensemble", ensemble), ("acac_torsion/sgmcmc_starts", recipe)):
        ratio = study["call_ratios"]["pool_top_k"]
        f.check(1, source, f"{key}.calls", study["calls"])
        f.check(2, source, f"{key}.call_ratios.pool_top_k.ratio x calls", ratio["ratio"] * study["calls"])
    per_seed = recipe["call_ratios"]["pool_top_k"]["per_seed"]
    f.check(6, source, "acac_torsion/sgmcmc_starts.call_ratios.pool_top_k.per_seed (seeds)", len(per_seed))
    for index, ratio in zip((3, 4, 5), per_seed):
        f.check(index, source, "acac_torsion/sgmcmc_starts.call_ratios.pool_top_k.per_seed x calls",
                ratio * recipe["calls"])
    f.assert_ok()

    f = Figures(README, r"(One SG-MCMC chain does not flag those frames and does not beat random there), and on "
                        r"pools that are half\s+\(ensemble\) or all \(one chain\) target distribution no rule beat "
                        r"random")
    for key in ("acac_torsion/sgmcmc", "acac_mixed/ensemble", "acac/sgmcmc"):
        ratios = studies[key]["call_ratios"]
        f.require(bool(ratios) and all(r["ratio"] is None for r in ratios.values()),
                  "never reaches random's final error (seed-mean curves)", source, f"{key}.call_ratios")
    f.assert_ok()


def test_onthefly_figures_are_those_of_the_onthefly_study():
    """The rule and fixed-interval arms' 600 K test force error (seed mean at the start and the end, the
    interval arm's final error per seed), the stability runs of seed 0's final rule posterior, and the same
    arms with the deep ensemble."""
    source = "study_onthefly_sgmcmc_starts.json"
    study = _json(source)
    f = Figures(README, r"(\d+) GFN2-xTB calls, SG-MCMC recipe, (\d+) seeds; `scripts/study_onthefly.py`\) the\s+"
                        r"epistemic rule lowers the 600 K test force error on every seed \(seed mean from (\d+) to "
                        r"(\d+) meV/Å\) while relabelling\s+every (\d+) steps raises it on every seed \(to (\d+) and "
                        r"(\d+) meV/Å on two; on the third the posterior broke, ([\d,]+)\s+meV/Å\), but no final "
                        r"model keeps hot MD physical \(seed 0's rule arm: (\d+) of (\d+) 1-ps runs at 600 K, (\d+) "
                        r"of (\d+) at\s+1,200 K\)")

    def start(arm):  # of the study read last
        return {seed: 1000 * s["history"][0]["forces_mae"] for seed, s in study["summaries"][arm].items()}

    def final(arm):
        return {seed: 1000 * e["md600_forces_mae"] for seed, e in study["final"][arm].items()}

    f.check(0, source, "calls", study["calls"])
    f.check(1, source, "summaries.rule (seeds)", len(study["summaries"]["rule"]))
    f.check(2, source, "summaries.rule[*].history[0].forces_mae (seed mean)", statistics.mean(start("rule").values()))
    f.check(3, source, "final.rule[*].md600_forces_mae (seed mean)", statistics.mean(final("rule").values()))
    f.check(4, source, "every", study["every"])
    for arm, lower in (("rule", True), ("interval", False)):
        f.require(all((final(arm)[s] < start(arm)[s]) == lower for s in start(arm)),
                  f"{arm} {'lowers' if lower else 'raises'} the error on every seed", source, f"final.{arm}")
    for index, value in zip((5, 6, 7), sorted(final("interval").values())):
        f.check(index, source, "final.interval[*].md600_forces_mae", value)
    for index, temperature in ((8, "600"), (10, "1200")):
        runs = study["stability"]["rule"]["0"][temperature]
        f.check(index, source, f"stability.rule.0.{temperature}.physical", runs["physical"])
        f.check(index + 1, source, f"stability.rule.0.{temperature}.n_runs", runs["n_runs"])
    f.assert_ok()

    source = "study_onthefly_ensemble.json"
    study = _json(source)
    f = Figures(README, r"With a deep ensemble \((\d+) seeds\) the seed means go from (\d+) to (\d+) meV/Å \(rule\) "
                        r"and (\d+) \(interval, above\s+its start on both seeds\)")
    f.require(all(final("interval")[s] > start("interval")[s] for s in start("interval")),
              "interval above its start on both seeds", source, "final.interval")
    f.check(0, source, "summaries.rule (seeds)", len(study["summaries"]["rule"]))
    f.check(1, source, "summaries.rule[*].history[0].forces_mae (seed mean)", statistics.mean(start("rule").values()))
    f.check(2, source, "final.rule[*].md600_forces_mae (seed mean)", statistics.mean(final("rule").values()))
    f.check(3, source, "final.interval[*].md600_forces_mae (seed mean)", statistics.mean(final("interval").values()))
    f.assert_ok()


def test_demo_time_is_that_of_the_demo_benchmark():
    """The README's wall time of ``make demo``: scripts/bench_demo.py's run of it."""
    source = "bench_demo.json"
    f = Figures(README, r"`make demo` \(([\d.]+) minutes on 2 CPU cores, docs/benchmarks.md\)")
    f.check(0, source, "minutes", _json(source)["minutes"])
    f.assert_ok()


def test_vesin_figure_is_that_of_the_neighbour_list_benchmark():
    """The README's speed-up of vesin over ASE's neighbour list: scripts/bench_neighbors.py's median ratio at the
    smallest and the largest cell it names."""
    source = "bench_neighbors.json"
    rows = {r["atoms"]: r for r in _json(source)["rows"]}
    f = Figures(README, r"vesin \(neighbour lists:\s+([\d.]+)x \((\d+) atoms\) to ([\d.]+)x \(([\d,]+) atoms\)"
                        r"\s+faster than ASE's")
    for ratio, atoms in ((0, 1), (2, 3)):
        n = int(f.match.group(atoms + 1).replace(",", ""))
        f.require(n in rows, f"{n} atoms", source, "rows[].atoms")
        if n in rows:
            f.check(ratio, source, f"rows[atoms={n}].ase_per_vesin", rows[n]["ase_per_vesin"])
    f.assert_ok()


def test_tio2_data_figures_are_those_of_the_ranges_script():
    """The README's counts of the TiO2 sets: the subset, the full set and what its filter drops."""
    source = "tio2/ranges.json"
    ranges = _json(source)
    f = Figures(README, r"the\s+(\d+)\s+structures the TiO2 filter drops")
    f.check(0, source, "full.structures - full_filtered.structures",
            ranges["full"]["structures"] - ranges["full_filtered"]["structures"])
    f.assert_ok()
    f = Figures(README, r"\| `configs/tio2_map.yaml` \| aenet TiO2, all ([\d,]+) structures")
    f.check(0, source, "full.structures", ranges["full"]["structures"])
    f.assert_ok()
    f = Figures(README, r"\| `configs/tio2_subset_map.yaml` \| the bundled ([\d,]+)-structure TiO2 subset")
    f.check(0, source, "subset.structures", ranges["subset"]["structures"])
    f.assert_ok()


def test_tio2_page_ranges_and_published_rows_are_those_of_the_ranges_script():
    """docs/tio2_results.md's notes (a) and (b) under the comparison table, and its published rows."""
    source = "tio2/ranges.json"
    ranges = _json(source)
    subset, full, kept = ranges["subset"], ranges["full"], ranges["full_filtered"]
    f = Figures(TIO2_PAGE, r"\(a\) The subset's range: referenced energies (−[\d.]+) to (−[\d.]+) eV/atom, force "
                           r"components up to ([\d.]+) eV/Å \(all\s+([\d,]+) structures;[\s\S]*?\)\. \(b\) A "
                           r"random 10 % of the\s+full set of ([\d,]+) structures, which reaches (\+[\d.]+) eV/atom "
                           r"and (\d+) eV/Å; ([\d,]+) of them \((\d+) %\) lie outside the\s+subset's range "
                           r"\(([\d,]+) above its highest energy, (\d+) below its lowest by less than 1e-5 eV/atom, "
                           r"([\d,]+) with a\s+larger force component; some by both\), ([\d,]+) \((\d+) %\) of the "
                           r"([\d,]+) that")
    for index, key, value in (
            (0, "subset.energy_per_atom_eV[0]", subset["energy_per_atom_eV"][0]),
            (1, "subset.energy_per_atom_eV[1]", subset["energy_per_atom_eV"][1]),
            (2, "subset.max_force_component_eV_per_A", subset["max_force_component_eV_per_A"]),
            (3, "subset.structures", subset["structures"]),
            (4, "full.structures", full["structures"]),
            (5, "full.energy_per_atom_eV[1]", full["energy_per_atom_eV"][1]),
            (6, "full.max_force_component_eV_per_A", full["max_force_component_eV_per_A"]),
            (7, "full.outside_subset.outside", full["outside_subset"]["outside"]),
            (8, "full.outside_subset.outside_fraction (%)", 100 * full["outside_subset"]["outside_fraction"]),
            (9, "full.outside_subset.energy_above", full["outside_subset"]["energy_above"]),
            (10, "full.outside_subset.energy_below", full["outside_subset"]["energy_below"]),
            (11, "full.outside_subset.force_above", full["outside_subset"]["force_above"]),
            (12, "full_filtered.outside_subset.outside", kept["outside_subset"]["outside"]),
            (13, "full_filtered.outside_subset.outside_fraction (%)", 100 * kept["outside_subset"]["outside_fraction"]),
            (14, "full_filtered.structures", kept["structures"])):
        f.check(index, source, key, value)
    f.require(subset["energy_per_atom_eV"][0] - full["energy_per_atom_eV"][0] < 1e-5,
              "below its lowest by less than 1e-5 eV/atom", source, "full.energy_per_atom_eV[0]")
    f.assert_ok()
    published, failures = ranges["published"]["means"], []
    for label, key in (("deep ensemble, full data", "de/full"), ("VI-BNN \\(LRT\\), full data", "lrt/full"),
                       ("VI-BNN \\(flipout\\), full data", "fo/full"), ("VI-BNN \\(LRT\\), small data", "lrt/small")):
        f = Figures(TIO2_PAGE, rf"\| Farris et al\.: {label} \| (\d+) \|[^|]*\|[^|]*\|[^|]*\| ([\d.]+) \| ([\d.]+) \| "
                               r"([\d.]+) \| (-[\d.]+) \|")
        mean = published[key]
        for index, field, value in ((0, "runs", mean["runs"]), (1, "mae_meV_per_atom", mean["mae_meV_per_atom"]),
                                    (2, "rmse_meV_per_atom", mean["rmse_meV_per_atom"]), (3, "rmsce", mean["rmsce"]),
                                    (4, "nll", mean["nll"])):
            f.check(index, source, f"published.means[{key}].{field}", value)
        failures += f.failures
    assert not failures, "\n".join(failures)


def test_tio2_page_fullset_summary_is_that_of_the_fullset_script():
    """docs/tio2_results.md's summary of the subset-trained models on the full set's test split: the ranges over
    the models of scripts/tio2_fullset.py's numbers, and the full-set MAP model's figure."""
    source = "tio2/fullset.json"
    record = _json(source)
    inside = [1000 * m["inside"]["energy_mae"] for m in record["models"].values()]
    together = [1000 * m["all"]["energy_mae"] for m in record["models"].values()]
    f = Figures(TIO2_PAGE, r"have an energy MAE of ([\d.]+)–([\d.]+) meV/atom inside the subset's range and "
                           r"(\d+)–(\d+) meV/atom over its (\d+) structures\s+not in the subset[\s\S]*?not converged "
                           r"has ([\d.]+) meV/atom on that split")
    f.check(0, source, "min over models of inside.energy_mae", min(inside))
    f.check(1, source, "max over models of inside.energy_mae", max(inside))
    f.check(2, source, "min over models of all.energy_mae", min(together))
    f.check(3, source, "max over models of all.energy_mae", max(together))
    f.check(4, source, "groups.all", record["groups"]["all"])
    f.check(5, "map_accuracy.json", "tio2_full.energy_mae_mev_per_atom",
            _json("map_accuracy.json")["tio2_full"]["energy_mae_mev_per_atom"])
    f.assert_ok()
