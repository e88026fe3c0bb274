"""``mlip-uq compare``: the study pipeline end to end on a tiny TiO2 subset (three methods, two splits)."""

import json

import numpy as np
import pytest
import torch
import yaml
from ase.io import read
from conftest import tiny_tio2_config

import mlip_uq.compare as compare_module
from mlip_uq.cli import main
from mlip_uq.compare import load_compare_config
from mlip_uq.posterior import load_posterior

DEFICIENT = ["O7Ti4", "O15Ti8", "O31Ti16", "O63Ti32"]


def study_file(tio2_path, tmp_path):
    base = tiny_tio2_config(tio2_path, 24, 8, training={"max_epochs": 2, "batch_size": 6})
    base["data"].pop("split")
    base["compare"] = {
        "regimes": {"full": {}},
        "splits": {
            "composition": {"kind": "composition", "test_clusters": DEFICIENT, "val_fraction": 0.1},
            "cell_size": {"kind": "cell_size", "max_train_atoms": 24, "val_fraction": 0.1},
        },
        "methods": {
            "map": {"method": "map"},
            "sgmcmc": {"method": "sgmcmc", "sgmcmc": {"lr": 2e-4, "batch_size": 6, "burnin_steps": 12,
                                                       "preheat_steps": 2, "n_samples": 3, "thinning": 2,
                                                       "init": "map", "prior": {"center": "map"}}},
            "ensemble": {"method": "ensemble", "ensemble": {"n_members": 2}},
        },
        "budgets": {"tiny": {"overrides": ["data.n_train=16"], "splits": ["cell_size"]}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture(scope="module")
def study(tio2_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    path = study_file(tio2_path, tmp)
    # the study in two parts: the SG-MCMC runs first (they bring their split's MAP run with them), then the rest
    assert main(["compare", str(path), "--out", str(tmp / "out"), "--regimes", "full", "--methods", "sgmcmc"]) == 0
    assert main(["compare", str(path), "--out", str(tmp / "out")]) == 0
    return path, tmp / "out"


def test_every_run_is_evaluated_before_and_after_recalibration(study):
    _, out = study
    results = json.loads((out / "results.json").read_text())
    runs = {(r["split"], r["method"]): r for r in results["runs"]}
    assert set(runs) == {(s, m) for s in ("composition", "cell_size") for m in ("map", "sgmcmc", "ensemble")}
    for (split, method), r in runs.items():
        assert r["n_train"] == 24 and r["train_seconds"] > 0 and r["inference_seconds_per_structure"] > 0
        assert np.isfinite(r["before"]["forces_mae"])
        # every model has a predictive std (one model: its learned noise), so every run is recalibrated
        assert r["n_samples"] == {"map": 1, "sgmcmc": 3, "ensemble": 2}[method] and r["calibration"]["forces"] > 0
        # the MAP model's validation curve ends by a stopping rule or by the 2-epoch budget, as recorded
        if method == "map":
            curve = r["plateau"]["."]
            assert curve["epochs"] == 2 and curve["stopped_by"] == "budget" and curve["val_energy_mae"] > 0
        # recalibration by the validation factor: NLL is computed with the rescaled std, sharpness scales
        assert r["after"]["forces_sharpness"] == pytest.approx(
            r["calibration"]["forces"] * r["before"]["forces_sharpness"], rel=1e-9)
    table = (out / "results.md").read_text()
    assert "### full data, composition split" in table and "| sgmcmc | 3 |" in table and " → " in table
    for png in ("calibration_full_composition.png", "calibration_full_cell_size.png", "bars_full.png"):
        assert (out / png).stat().st_size > 5000


def test_sgmcmc_starts_from_the_study_map_run(study):
    _, out = study
    results = json.loads((out / "results.json").read_text())
    runs = {(r["split"], r["method"]): r for r in results["runs"]}
    for split in ("composition", "cell_size"):
        run = out / "full" / split / "sgmcmc"
        config = yaml.safe_load((run / "config.yaml").read_text())
        start = str(out / "full" / split / "map" / "posterior.h5")
        assert config["sgmcmc"]["init"] == start and config["sgmcmc"]["prior"]["center"] == start
        assert not (run / "map").exists()  # no MAP phase of its own
        assert runs[split, "sgmcmc"]["map_seconds"] == runs[split, "map"]["train_seconds"]
        assert runs[split, "sgmcmc"]["plateau"] == {}  # a sampler has no validation curve
        for key in ("ood_auroc", "ood_auroc_mean", "ood_auroc_epistemic", "ood_auroc_epistemic_mean"):
            assert 0.0 <= runs[split, "sgmcmc"][key] <= 1.0
        # one model has no spread: its epistemic score cannot tell anything apart
        assert runs[split, "map"]["ood_auroc_epistemic"] == 0.5


def test_ensemble_takes_the_study_map_model_as_member_zero(study):
    _, out = study
    results = json.loads((out / "results.json").read_text())
    runs = {(r["split"], r["method"]): r for r in results["runs"]}
    for split in ("composition", "cell_size"):
        run = out / "full" / split / "ensemble"
        members = [torch.load(run / "members" / str(k) / "final.pt", weights_only=True) for k in (0, 1)]
        map_state = load_posterior(out / "full" / split / "map" / "posterior.h5").state_dict(0)
        assert members[0].keys() == map_state.keys()
        assert all(torch.equal(members[0][name], map_state[name]) for name in map_state)
        assert not all(torch.equal(members[1][name], map_state[name]) for name in map_state)
        assert not (run / "members" / "0" / "checkpoints").exists()  # not trained again
        assert (run / "members" / "1" / "checkpoints").is_dir()
        # its cost and its validation curve are the MAP run's
        assert runs[split, "ensemble"]["map_seconds"] == runs[split, "map"]["train_seconds"]
        assert runs[split, "ensemble"]["plateau"]["members/0"] == runs[split, "map"]["plateau"]["."]
        assert set(runs[split, "ensemble"]["plateau"]) == {"members/0", "members/1"}


def test_splits_hold_out_what_they_claim(study, tio2_path):
    _, out = study
    frames = read(tio2_path, ":")
    for split, is_test in (
        ("composition", lambda a: a.get_chemical_formula(empirical=True) in DEFICIENT),
        ("cell_size", lambda a: len(a) > 24),
    ):
        idx = json.loads((out / "full" / split / "map" / "splits.json").read_text())
        assert idx["test"] and all(is_test(frames[i]) for i in idx["test"])
        assert not any(is_test(frames[i]) for i in idx["train"] + idx["val"])


def test_finished_runs_are_reused_and_budgets_select(study, tmp_path, monkeypatch):
    path, out = study
    monkeypatch.setattr(compare_module, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    # a row of an earlier version (here: one written before row versions, without the epistemic OOD score) is
    # evaluated again, from the trained run
    summary = out / "full" / "cell_size" / "ensemble" / "compare.json"
    old_row = json.loads(summary.read_text())
    assert old_row["row_version"] == compare_module.ROW_VERSION
    summary.write_text(json.dumps({k: v for k, v in old_row.items() if k not in ("row_version", "ood_auroc_epistemic")}))
    results = compare_module.compare(path, out)
    assert len(results["runs"]) == 6
    new_row = json.loads(summary.read_text())
    assert new_row["ood_auroc_mean"] == pytest.approx(old_row["ood_auroc_mean"], abs=1e-12)
    assert new_row["ood_auroc"] == pytest.approx(old_row["ood_auroc"], abs=1e-12)
    assert new_row["ood_auroc_epistemic"] == pytest.approx(old_row["ood_auroc_epistemic"], abs=1e-12)
    assert new_row["train_seconds"] == old_row["train_seconds"]
    tiny = load_compare_config(path, budget="tiny")
    assert list(tiny["splits"]) == ["cell_size"] and tiny["overrides"] == ["data.n_train=16"]
    config = compare_module.run_config(tiny, "full", "cell_size", "sgmcmc")
    assert config["method"] == "sgmcmc" and config["data"]["n_train"] == 16
    assert config["data"]["split"]["kind"] == "cell_size"
    with pytest.raises(ValueError, match="budget 'gpu' is not in compare.budgets"):
        load_compare_config(path, budget="gpu")
    with pytest.raises(ValueError, match=r"--methods \['vi'\] not in the study"):
        compare_module.compare(path, out, methods=["vi"])
