"""``mlip-uq data``: fetch from a (local, file://) source, SHA-256 and fingerprint checks, interrupted and corrupt
downloads leave nothing half-written, the converters, the registry, the command line. Offline throughout."""

import io
import re
import tarfile

import ase.io
import numpy as np
import pytest
from ase import units
from conftest import BUNDLED_ETHANOL_TEST, BUNDLED_ETHANOL_TRAIN, BUNDLED_TIO2, full_data_set

from mlip_uq import datasets
from mlip_uq.cli import main
from mlip_uq.converters import convert_aenet_xsf_archive, convert_rmd17_npz, copy_files
from mlip_uq.datasets import (
    REGISTRY,
    ConvertedFile,
    DataSet,
    DatasetError,
    Download,
    content_fingerprint,
    describe_file,
    fetch,
    sha256_file,
)

NAME = "ethanol_sample"
FILE = BUNDLED_ETHANOL_TEST.name


def _entry(url: str, sha256=None, expected=None) -> DataSet:
    return DataSet(name=NAME, description="50 rMD17 ethanol structures", source="data/", licence="CC0-1.0",
                   citation="-", downloads=(Download(FILE, url, sha256),), convert=copy_files,
                   files={FILE: expected or describe_file(BUNDLED_ETHANOL_TEST)})


@pytest.fixture
def registered(monkeypatch):
    """Registers :func:`_entry` (a data set of the bundled ethanol file, served by a file:// URL) as NAME."""
    def register(**kwargs) -> DataSet:
        entry = _entry(kwargs.pop("url", BUNDLED_ETHANOL_TEST.as_uri()), **kwargs)
        monkeypatch.setitem(REGISTRY, NAME, entry)
        return entry
    return register


def _left_in(cache):
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def test_fetch_downloads_verifies_and_converts_into_the_cache(registered, tmp_path, capsys):
    registered(sha256=sha256_file(BUNDLED_ETHANOL_TEST))
    cache = tmp_path / "cache"
    assert main(["data", "fetch", NAME, "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "(verified)" in out and str(cache / NAME / FILE) in out and f"dataset:{NAME}/{FILE}" in out
    assert (cache / NAME / FILE).read_bytes() == BUNDLED_ETHANOL_TEST.read_bytes()
    assert _left_in(cache) == [NAME, f"{NAME}/{FILE}"]  # no .partial file or folder left
    assert datasets.dataset_path(f"dataset:{NAME}/{FILE}", cache) == cache / NAME / FILE
    assert fetch(NAME, cache) == cache / NAME  # already there: nothing downloaded
    assert main(["data", "list", "--cache", str(cache)]) == 0
    assert re.search(rf"{NAME}\s+fetched", capsys.readouterr().out)


def test_the_cache_folder_comes_from_the_environment(registered, tmp_path, monkeypatch):
    registered()
    monkeypatch.setenv("MLIP_UQ_DATA", str(tmp_path / "env_cache"))
    assert datasets.cache_dir() == tmp_path / "env_cache"
    assert fetch(NAME) == tmp_path / "env_cache" / NAME
    monkeypatch.delenv("MLIP_UQ_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.cache_dir() == tmp_path / "xdg" / "mlip_uq"


def test_a_wrong_checksum_leaves_nothing_and_says_so(registered, tmp_path, capsys):
    registered(sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="SHA-256 .* differs from the registry's 0000"):
        fetch(NAME, cache)
    assert _left_in(cache) == []
    assert main(["data", "fetch", NAME, "--cache", str(cache)]) == 2
    assert "differs from the registry" in capsys.readouterr().err


class _Response:
    """A response that announces ``length`` bytes, yields ``chunks`` and then raises ``error`` (or ends)."""

    def __init__(self, chunks, length, error=None):
        self.chunks, self.error, self.headers = list(chunks), error, {"Content-Length": str(length)}

    def read(self, size=-1):
        if self.chunks:
            return self.chunks.pop(0)
        if self.error is not None:
            raise self.error
        return b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("response, message", [
    (_Response([b"x" * 1000], 5000, ConnectionResetError("connection reset by peer")), "failed after 1000 bytes"),
    (_Response([b"x" * 1000], 5000), "cut short: 1000 of 5000 bytes"),
])
def test_an_interrupted_download_leaves_nothing_half_written(registered, tmp_path, monkeypatch, response, message):
    registered(url="https://example.invalid/ethanol.extxyz")
    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda url, timeout: response)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=message):
        fetch(NAME, cache)
    assert _left_in(cache) == []


def test_a_missing_source_is_a_clear_error(registered, tmp_path):
    registered(url=(tmp_path / "nowhere.extxyz").as_uri())
    with pytest.raises(DatasetError, match="download of file://.*nowhere.extxyz failed"):
        fetch(NAME, tmp_path / "cache")
    assert _left_in(tmp_path / "cache") == []


def test_a_converted_file_that_differs_is_refused_and_an_earlier_copy_is_kept(registered, tmp_path):
    cache = tmp_path / "cache"
    registered()
    fetch(NAME, cache)
    before = (cache / NAME / FILE).read_bytes()
    registered(expected=ConvertedFile(frames=50, fingerprint="f" * 64))
    with pytest.raises(DatasetError, match="does not match the registry: 50 frames, fingerprint"):
        fetch(NAME, cache, force=True)
    assert _left_in(cache) == [NAME, f"{NAME}/{FILE}"] and (cache / NAME / FILE).read_bytes() == before


def test_fetch_from_a_local_copy_verifies_it(registered, tmp_path, capsys):
    registered()
    cache = tmp_path / "cache"
    assert main(["data", "fetch", NAME, "--cache", str(cache), "--from", str(BUNDLED_ETHANOL_TEST.parent)]) == 0
    assert "copied 1 file(s)" in capsys.readouterr().out and (cache / NAME / FILE).is_file()
    with pytest.raises(DatasetError, match="does not exist"):
        fetch(NAME, tmp_path / "other", source=tmp_path)


def test_rmd17_npz_converter_reproduces_the_converted_file(tmp_path):
    """An npz in rMD17's own units (kcal/mol, kcal/mol/Å), made from the shipped frames, converts back to them."""
    frames = ase.io.read(BUNDLED_ETHANOL_TEST, ":")
    per_kcal = units.mol / units.kcal
    npz = tmp_path / "rmd17_ethanol_test_01.npz"
    np.savez(npz, nuclear_charges=frames[0].numbers, coords=np.stack([a.positions for a in frames]),
             energies=np.array([a.get_potential_energy() * per_kcal for a in frames]),
             forces=np.stack([a.get_forces() * per_kcal for a in frames]),
             old_indices=np.array([a.info["rmd17_old_index"] for a in frames]))
    convert_rmd17_npz({npz.name: npz}, tmp_path)
    converted = ase.io.read(tmp_path / "rmd17_ethanol_test_01.extxyz", ":")
    assert content_fingerprint(converted) == content_fingerprint(frames)
    assert converted[3].info == frames[3].info and not converted[0].pbc.any()


def _xsf(atoms) -> str:
    rows = [f"{s} {x:.8f} {y:.8f} {z:.8f} {fx:.8f} {fy:.8f} {fz:.8f}"
            for s, (x, y, z), (fx, fy, fz) in zip(atoms.get_chemical_symbols(), atoms.positions, atoms.get_forces())]
    cell = [" ".join(f"{v:.8f}" for v in row) for row in atoms.cell.array]
    return "\n".join([f"# total energy = {atoms.get_potential_energy():.8f} eV", "", "CRYSTAL", "PRIMVEC", *cell,
                      "PRIMCOORD", f"{len(atoms)} 1", *rows, ""])


def test_aenet_xsf_archive_converter_keeps_structure_number_order(tmp_path):
    frames = ase.io.read(BUNDLED_TIO2, ":3")
    archive = tmp_path / "psi-k.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for number in (3, 1, 2):  # out of order in the archive
            data = _xsf(frames[number - 1]).encode()
            info = tarfile.TarInfo(f"psi-k-mlip-workshop-2021-abc/xsf/structure{number:04d}.xsf")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = tarfile.TarInfo("psi-k-mlip-workshop-2021-abc/xsf/README.txt")
        tar.addfile(readme, io.BytesIO(b""))
    convert_aenet_xsf_archive({archive.name: archive}, tmp_path)
    converted = ase.io.read(tmp_path / "tio2_aenet_7815.extxyz", ":")
    assert [a.info["source_file"] for a in converted] == ["structure0001.xsf", "structure0002.xsf",
                                                          "structure0003.xsf"]
    assert content_fingerprint(converted) == content_fingerprint(frames) and converted[0].pbc.all()


def test_the_registry_names_pinned_sources_and_well_formed_checksums():
    assert {"rmd17_ethanol", "tio2_aenet", "botnet_acac"} <= set(REGISTRY)
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.files and spec.licence and spec.citation
        for item in spec.downloads:
            assert re.match(r"https://(raw\.githubusercontent\.com|github\.com)/[\w.-]+/[\w.-]+/.*[0-9a-f]{40}",
                            item.url), item.url
            assert item.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", item.sha256)
        for file in spec.files.values():
            assert file.frames > 0 and re.fullmatch(r"[0-9a-f]{64}", file.fingerprint)
        assert spec.note  # what was verified, and what not


@pytest.mark.parametrize("shipped, split", [(BUNDLED_ETHANOL_TRAIN, "train"), (BUNDLED_ETHANOL_TEST, "test")])
def test_the_shipped_ethanol_files_are_the_first_frames_of_the_registered_splits(shipped, split):
    """data/'s rMD17 files are byte-for-byte the first 200 / 50 frames of the files ``rmd17_ethanol`` fetches
    (checked where the full data set is on the machine)."""
    file = f"rmd17_ethanol_{split}_01.extxyz"
    full = full_data_set("rmd17_ethanol", file, f"rmd17/{file}")
    assert full.read_bytes().startswith(shipped.read_bytes())
    frames = len(ase.io.read(shipped, ":"))
    assert (frames, REGISTRY["rmd17_ethanol"].files[file].frames) == ({"train": 200, "test": 50}[split], 1000)


def test_a_download_the_converter_cannot_read_is_a_clear_error(tmp_path, monkeypatch):
    """E.g. an error page or a Git LFS pointer where an npz was expected: named, and nothing left in the cache."""
    bad = tmp_path / "rmd17_ethanol_test_01.npz"
    bad.write_text("version https://git-lfs.github.com/spec/v1\n")
    entry = DataSet(name="npz_sample", description="-", source="-", licence="-", citation="-",
                    downloads=(Download(bad.name, bad.as_uri()),), convert=convert_rmd17_npz,
                    files={"rmd17_ethanol_test_01.extxyz": ConvertedFile(50, "0" * 64)})
    monkeypatch.setitem(REGISTRY, "npz_sample", entry)
    with pytest.raises(DatasetError, match="npz_sample: converting the downloaded files failed"):
        fetch("npz_sample", tmp_path / "cache")
    assert _left_in(tmp_path / "cache") == []
