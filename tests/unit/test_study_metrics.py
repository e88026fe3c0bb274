"""The per-study records of ``mlip-uq compare``: how a validation curve ended (:func:`plateau`) and the
per-structure uncertainties its out-of-distribution AUROCs score (``Predictions.max_atom_force_std`` and
``mean_atom_force_std``)."""

import csv

import numpy as np
import pytest

from mlip_uq.compare import plateau
from mlip_uq.evaluate import Predictions

FIELDS = ["epoch", "val_loss", "val_energy_mae", "val_forces_mae", "lr"]


def curve(tmp_path, losses, lrs, energy=None):
    path = tmp_path / "metrics.csv"
    energy = losses if energy is None else energy
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for i, (loss, lr, e) in enumerate(zip(losses, lrs, energy)):
            writer.writerow({"epoch": i, "val_loss": loss, "val_energy_mae": e, "val_forces_mae": 2 * e, "lr": lr})
    return path


def test_plateau_names_the_rule_that_stopped_training(tmp_path):
    falling = [1.0 / (i + 1) for i in range(8)]
    record = plateau(curve(tmp_path, falling, [0.01] * 8), min_lr=1e-4, patience=3)
    # still improving when the budget ended, and by 1/6 -> 1/8 (25 %) in the last quarter
    assert record["stopped_by"] == "budget" and record["best_epoch"] == 7 and record["epochs"] == 8
    assert record["energy_mae_gain_last_quarter"] == pytest.approx(0.25)
    assert record["val_forces_mae"] == pytest.approx(2 / 8)
    flat = [1.0, 0.5, 0.4, 0.41, 0.42, 0.43, 0.44, 0.45]
    record = plateau(curve(tmp_path, flat, [0.01] * 8), min_lr=1e-4, patience=5)
    assert record["stopped_by"] == "patience" and record["best_epoch"] == 2
    assert record["energy_mae_gain_last_quarter"] == 0.0
    record = plateau(curve(tmp_path, flat, [0.01] * 4 + [1e-4] * 4), min_lr=1e-4, patience=50)
    assert record["stopped_by"] == "lr_floor" and record["final_lr"] == 1e-4


def test_plateau_refuses_an_empty_curve(tmp_path):
    with pytest.raises(ValueError, match="no epoch rows"):
        plateau(curve(tmp_path, [], []), min_lr=1e-4, patience=5)


def predictions_with_force_std(n_atoms, std):
    """Predictions of zero error whose only content is the per-component force stds ``std`` (N, 3)."""
    zeros = np.zeros(len(n_atoms))
    return Predictions(n_atoms=np.asarray(n_atoms), energy_true=zeros, energy_pred=zeros, energy_std=zeros + 1,
                       forces_true=std * 0, forces_pred=std * 0, forces_std=std, n_samples=1,
                       energy_std_uncalibrated=zeros + 1, forces_std_uncalibrated=std)


def test_max_atom_force_std_is_the_largest_atom_norm_per_structure():
    std = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.5], [0.1, 0.1, 0.1]])
    pred = predictions_with_force_std([2, 3], std)
    np.testing.assert_allclose(pred.max_atom_force_std(), [5.0, 3.0])
    np.testing.assert_allclose(pred.mean_atom_force_std(), [3.0, (3.0 + 0.5 + np.sqrt(0.03)) / 3])


def test_mean_atom_force_std_does_not_grow_with_the_cell():
    """Every atom equally uncertain: the mean per-atom std is the same for a small and a 4x larger cell, while
    the largest of the larger cell's draws is above the small one's (what the cell-size split's max score sees)."""
    rng = np.random.default_rng(0)
    n_atoms = np.array([24] * 200 + [96] * 200)
    std = np.abs(rng.normal(1.0, 0.1, (n_atoms.sum(), 3)))
    pred = predictions_with_force_std(n_atoms, std)
    small, large = slice(0, 200), slice(200, 400)
    mean, largest = pred.mean_atom_force_std(), pred.max_atom_force_std()
    assert abs(mean[large].mean() - mean[small].mean()) < 0.01
    assert largest[large].mean() > largest[small].mean() + 0.03


def test_ood_scores_read_the_epistemic_part_apart_from_the_predictive():
    from dataclasses import replace

    from mlip_uq.compare import ood_scores

    std = np.full((5, 3), 0.2)
    inside = predictions_with_force_std([2, 3], std)
    with pytest.raises(ValueError, match="needs the epistemic force stds"):
        inside.max_atom_force_std("epistemic")
    # in distribution: spread 0.01 per component; out of it: 0.03, with the predictive std unchanged (noise)
    inside = replace(inside, forces_std_epistemic=np.full((5, 3), 0.01))
    outside = replace(predictions_with_force_std([2, 3], std), forces_std_epistemic=np.full((5, 3), 0.03))
    scores = ood_scores(inside, outside)
    assert scores["ood_auroc_epistemic"] == 1.0 and scores["ood_auroc_epistemic_mean"] == 1.0
    assert scores["ood_auroc"] == 0.5  # the predictive std is the same everywhere: no ranking
    assert scores["epistemic_ratio"] == pytest.approx(3.0)
    np.testing.assert_allclose(outside.max_atom_force_std("bald"), 0.5 * np.log1p(0.0027 / (0.12 - 0.0027)))
