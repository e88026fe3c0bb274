"""read_frames / validate_frames / frames_fingerprint: agreement with ase.io.read, label keys, bad inputs."""

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from mlip_uq.data import DataError, LabelKeys, frames_fingerprint, read_frames, validate_frames


def _water(positions=((0.0, 0.0, 0.0), (0.96, 0.0, 0.0), (0.0, 0.96, 0.0)), **labels) -> ase.Atoms:
    atoms = ase.Atoms("H2O", positions=positions)
    labels = {"energy": -14.2, "forces": np.zeros((3, 3))} | labels
    atoms.calc = SinglePointCalculator(atoms, **{k: v for k, v in labels.items() if v is not None})
    return atoms


@pytest.mark.parametrize("which", ["tio2", "ethanol"])
def test_read_frames_matches_ase(which, tio2_path, ethanol_train):
    path = tio2_path if which == "tio2" else ethanol_train
    frames, reference = read_frames(path), ase.io.read(path, ":")
    assert len(frames) == len(reference) > 100
    energies = [[a.get_potential_energy() for a in frames_] for frames_ in (frames, reference)]
    np.testing.assert_array_equal(*energies)
    for mine, theirs in zip(frames, reference):
        np.testing.assert_array_equal(mine.get_forces(), theirs.get_forces())
        np.testing.assert_array_equal(mine.positions, theirs.positions)


def test_custom_label_keys(tmp_path):
    atoms = ase.Atoms("H2O", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], cell=np.eye(3) * 5.0, pbc=True)
    forces, stress = np.arange(9.0).reshape(3, 3), np.arange(9.0).reshape(3, 3) * 0.01
    atoms.info.update(dft_energy=-3.5, dft_stress=stress)
    atoms.arrays["dft_forces"] = forces
    path = tmp_path / "custom.extxyz"
    ase.io.write(path, [atoms, atoms], format="extxyz")

    frames = read_frames(path, keys=LabelKeys(energy="dft_energy", forces="dft_forces", stress="dft_stress"))
    assert len(frames) == 2
    assert frames[0].get_potential_energy() == -3.5
    np.testing.assert_array_equal(frames[0].get_forces(), forces)
    np.testing.assert_allclose(frames[0].calc.results["stress"], [0.0, 0.04, 0.08, 0.06, 0.04, 0.02])
    with pytest.raises(DataError, match="frame 0: missing required label 'energy'"):
        read_frames(path)


def _write(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return path


BAD_FILES = {
    "missing_label": (lambda: [_water(energy=None)], {}, r"missing required label 'energy'"),
    "unknown_element": (
        lambda: [_water()], {"type_names": ["H", "C"]}, r"element\(s\) \['O'\] not in type_names \['H', 'C'\]"
    ),
    "nan_position": (
        lambda: [_water(positions=((0, 0, 0), (0.96, 0, 0), (0, np.nan, 0)))],
        {},
        r"NaN or inf in positions of atom\(s\) \[2\]",
    ),
    "nan_force": (
        lambda: [_water(forces=np.array([[0, 0, 0], [0, np.nan, 0], [0, 0, 0]]))], {}, r"frame 0: NaN or inf in forces"
    ),
    "overlap": (
        lambda: [_water(), _water(positions=((0, 0, 0), (0.3, 0, 0), (0, 0.96, 0)))],
        {},
        r"frame 1: atoms 0 and 1 .* 0\.3000 Å apart, closer than min_distance=0\.5",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_frames_raise(case, tmp_path):
    make, kwargs, message = BAD_FILES[case]
    path = _write(tmp_path / f"{case}.extxyz", make())
    with pytest.raises(DataError, match=message):
        read_frames(path, **kwargs)


def test_overlap_through_periodic_image_raises(tmp_path):
    atoms = ase.Atoms("H2", positions=[[0.1, 5, 5], [9.9, 5, 5]], cell=np.eye(3) * 10.0)
    atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((2, 3)))
    validate_frames([atoms])  # non-periodic: 9.8 Å apart
    atoms.pbc = True
    with pytest.raises(DataError, match=r"atoms 0 and 1 \(image shift \[-1, 0, 0\]\) are 0\.2000 Å apart"):
        validate_frames([atoms])
    atoms.pbc, atoms.cell = True, np.eye(3) * 0.3  # an atom overlaps its own image
    with pytest.raises(DataError, match=r"atoms 0 and 0 .* 0\.3000 Å apart"):
        validate_frames([atoms[:1]], require=())


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"empty file, no frames"),
        (b'0\nProperties=species:S:1:pos:R:3 energy=1.0 pbc="F F F"\n', r"frame 0: zero atoms"),
        (np.random.default_rng(0).bytes(4000), r"cannot read, corrupt or unknown format"),
    ],
    ids=["empty", "zero_atoms", "random_bytes"],
)
def test_bad_file_raises_naming_file(content, message, tmp_path):
    path = tmp_path / "bad.extxyz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"bad.extxyz: {message}"):
        read_frames(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.extxyz: file not found"):
        read_frames(tmp_path / "nothing.extxyz")


def test_validate_shapes_cells_and_empty():
    with pytest.raises(DataError, match="no frames"):
        validate_frames([])
    with pytest.raises(DataError, match=r"forces has shape \(3, 2\), expected one of \[\(3, 3\)\]"):
        validate_frames([_water(forces=np.zeros((3, 2)))])
    with pytest.raises(DataError, match="NaN or inf in energy"):
        validate_frames([_water(energy=np.inf)])
    periodic = _water()
    periodic.pbc = True  # zero cell
    with pytest.raises(DataError, match="zero or singular cell"):
        validate_frames([periodic])
    periodic.cell = [[5, 0, 0], [10, 0, 0], [0, 0, 5]]  # two parallel vectors
    with pytest.raises(DataError, match="zero or singular cell"):
        validate_frames([periodic])
    with pytest.raises(DataError, match="unknown required label"):
        validate_frames([_water()], require=("energy", "charges"))


def test_stress_forms_and_bad_stress(tmp_path):
    atoms = _water()
    atoms.cell, atoms.pbc = np.eye(3) * 6.0, True
    for stress in (np.arange(6.0), np.arange(9.0)):
        atoms.info["s"] = stress
        frames = read_frames(_write(tmp_path / "s.extxyz", [atoms]), keys=LabelKeys(stress="s"), require=("stress",))
        assert frames[0].calc.results["stress"].shape == (6,)
    atoms.info["s"] = np.arange(4.0)
    with pytest.raises(DataError, match=r"stress must have 6 \(Voigt\), 9 or 3x3 values"):
        read_frames(_write(tmp_path / "s.extxyz", [atoms]), keys=LabelKeys(stress="s"))


def test_fingerprint_changes_with_any_field():
    frames = [_water(), _water()]
    reference = frames_fingerprint(frames)
    assert reference == frames_fingerprint([_water(), _water()])
    assert reference != frames_fingerprint(frames[:1])
    changed = [_water(), _water(forces=np.full((3, 3), 1e-12))]
    assert reference != frames_fingerprint(changed)
    moved = [_water(), _water()]
    moved[1].positions[0, 0] += 1e-12
    assert reference != frames_fingerprint(moved)
