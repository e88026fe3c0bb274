"""mlip_uq.uq.plots write real PNG files and leave matplotlib's global state alone."""

import numpy as np
import pytest

from mlip_uq.uq import calibration_plot, error_vs_std_plot, parity_plot, training_curve_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes
    # 150 dpi: width in the IHDR chunk
    width = int.from_bytes(data[16:20], "big")
    return width


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    n_struct, n_atoms = 60, 1500  # 4500 force components: the colour/hexbin branches
    e_std = rng.uniform(0.001, 0.01, n_struct)
    e_true = rng.normal(-4.0, 0.05, n_struct)
    e_pred = e_true + e_std * rng.normal(size=n_struct)
    f_std = rng.uniform(0.02, 0.3, (n_atoms, 3))
    f_true = rng.normal(0.0, 1.0, (n_atoms, 3))
    f_pred = f_true + f_std * rng.normal(size=(n_atoms, 3))
    return e_pred, e_true, e_std, f_pred, f_true, f_std


def test_parity_plot_with_and_without_std(tmp_path, data):
    e_pred, e_true, e_std, f_pred, f_true, f_std = data
    out = parity_plot(e_pred, e_true, f_pred, f_true, tmp_path / "sub" / "parity.png",
                      energy_std=e_std, forces_std=f_std, title="test")
    assert out == tmp_path / "sub" / "parity.png"
    assert _assert_png(out) == 11 * 150
    out2 = parity_plot(e_pred, e_true, f_pred[:100], f_true[:100], str(tmp_path / "parity_map.png"))
    _assert_png(out2)
    with pytest.raises(ValueError):
        parity_plot(e_pred, e_true[:-1], f_pred, f_true, tmp_path / "bad.png")


def test_calibration_plot(tmp_path, data):
    _, _, _, f_pred, f_true, f_std = data
    out = calibration_plot(f_pred - f_true, f_std / 2, tmp_path / "cal.png")
    assert _assert_png(out) == 5 * 150


@pytest.mark.parametrize("n", [300, 4500])  # scatter and hexbin branches
def test_error_vs_std_plot(tmp_path, data, n):
    _, _, _, f_pred, f_true, f_std = data
    err = np.abs(f_pred - f_true).reshape(-1)[:n]
    err[0] = 0.0  # a zero error cannot go on log axes; must not crash
    out = error_vs_std_plot(err, f_std.reshape(-1)[:n], tmp_path / f"evs_{n}.png")
    _assert_png(out)


def test_training_curve_plot(tmp_path):
    rows = ["epoch,step,train_loss,val_loss,val_energy_mae,val_forces_mae,lr"]
    rows += [f"{e},{10 * e},1.0,{-e if e < 30 else -30 + (e - 30) * 0.1},{0.01 / (e + 1)},{0.1 / (e + 1)},"
             f"{0.01 if e < 20 else 0.005}" for e in range(40)]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    assert _assert_png(training_curve_plot(tmp_path / "metrics.csv", tmp_path / "curve.png")) == int(6.5 * 150)
    (tmp_path / "empty.csv").write_text(rows[0] + "\n")
    with pytest.raises(ValueError, match="no validation rows"):
        training_curve_plot(tmp_path / "empty.csv", tmp_path / "none.png")


def test_plots_do_not_touch_global_matplotlib_state(tmp_path, data):
    import matplotlib
    import matplotlib.pyplot as plt

    backend, rc = matplotlib.get_backend(), dict(matplotlib.rcParams)
    figs_before = plt.get_fignums()
    e_pred, e_true, e_std, f_pred, f_true, f_std = data
    parity_plot(e_pred, e_true, f_pred, f_true, tmp_path / "p.png", energy_std=e_std, forces_std=f_std)
    calibration_plot(f_pred - f_true, f_std, tmp_path / "c.png")
    error_vs_std_plot(np.abs(f_pred - f_true), f_std, tmp_path / "e.png")
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == figs_before  # no figures left in pyplot's registry
    assert dict(matplotlib.rcParams) == rc
