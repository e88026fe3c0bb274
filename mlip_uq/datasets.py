"""Public data sets by name: download from the original source, verify, convert to extended XYZ, cache.

``mlip-uq data fetch NAME`` (:func:`fetch`) puts data set ``NAME`` of :data:`REGISTRY` into
``<cache>/NAME/`` (:func:`cache_dir`: ``$MLIP_UQ_DATA``, else ``$XDG_CACHE_HOME/mlip_uq``, else
``~/.cache/mlip_uq``), and a configuration names its files as ``dataset:NAME/FILE``
(:func:`dataset_path`, called by :func:`mlip_uq.config.resolve_path`); a data set that is not in the cache is
reported with the command that fetches it. The converters (npz, XSF -> extended XYZ) are in
:mod:`mlip_uq.converters`.

What is verified:

- every download against the SHA-256 of the file, where the registry records one (``Download.sha256``);
- every converted file against its frame count and :func:`content_fingerprint` (SHA-256 of the atomic numbers,
  positions, cell, pbc, energy and forces rounded to 1e-5 Å / eV / eV/Å), computed once from the copy of the data
  set that the project's benchmarks were run on. The fingerprint does not depend on how the numbers are printed, so
  the converted file is checked even where the upstream file's own SHA-256 could not be recorded (the sources
  could not be reached when the registry was written: ``Download.sha256`` None, see each entry's ``note``).

Nothing half-written is left in the cache: downloads go to ``<cache>/.NAME.partial/<file>.partial``, are renamed
when complete and verified; the converted files are written there too, and the folder is renamed to
``<cache>/NAME`` only when every file is verified. A failed or interrupted fetch removes its temporary folder and
leaves an earlier copy of the data set as it was.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .converters import DatasetError, convert_aenet_xsf_archive, convert_rmd17_npz, copy_files

#: the prefix of a configuration path that names a file of a registered data set: ``dataset:NAME/FILE``
SCHEME = "dataset:"
#: the environment variable that sets the cache folder
CACHE_ENV = "MLIP_UQ_DATA"
_CHUNK = 1 << 20


class DatasetNotFetchedError(FileNotFoundError):
    """A registered data set (or one of its files) that is not in the cache; the message names the command that
    fetches it."""


@dataclass(frozen=True)
class Download:
    """One file downloaded from the data set's original source.

    Attributes:
        name: the file name it is saved under (in the temporary folder of the fetch).
        url: where it is downloaded from (``https://``, or ``file://`` for a local copy).
        sha256: the SHA-256 of the downloaded file; None where it could not be recorded (the converted files are
            verified all the same, by their fingerprints).
    """

    name: str
    url: str
    sha256: Optional[str] = None


@dataclass(frozen=True)
class ConvertedFile:
    """A file of the data set as the cache holds it (extended XYZ).

    Attributes:
        frames: its number of structures.
        fingerprint: its :func:`content_fingerprint`.
    """

    frames: int
    fingerprint: str


@dataclass(frozen=True)
class DataSet:
    """One entry of :data:`REGISTRY`.

    Attributes:
        name: the name ``mlip-uq data fetch`` takes, and the folder of the cache.
        description: one line: what the data set is.
        source: the original source (repository and commit, or archive), as cited.
        licence: its licence.
        citation: the paper to cite.
        downloads: the files to download.
        convert: the converter: ``convert(downloads, out_dir)`` writes the files of ``files`` into ``out_dir``
            from the downloaded files (``downloads``: download name -> path).
        files: the converted files, by name.
        note: what was and was not verified when the entry was written.
    """

    name: str
    description: str
    source: str
    licence: str
    citation: str
    downloads: Tuple[Download, ...]
    convert: Callable[[Dict[str, Path], Path], None]
    files: Dict[str, ConvertedFile] = field(default_factory=dict)
    note: str = ""


def cache_dir() -> Path:
    """The cache folder: ``$MLIP_UQ_DATA``, else ``$XDG_CACHE_HOME/mlip_uq``, else ``~/.cache/mlip_uq``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mlip_uq"


def get(name: str) -> DataSet:
    """The registry entry ``name``.

    Raises:
        DatasetError: ``name`` is not registered (the error lists the names that are).
    """
    if name not in REGISTRY:
        raise DatasetError(f"unknown data set {name!r}; registered: {', '.join(REGISTRY)} (mlip-uq data list)")
    return REGISTRY[name]


def fetch_command(name: str) -> str:
    return f"mlip-uq data fetch {name}"


def is_dataset_path(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a ``dataset:NAME/FILE`` name."""
    return isinstance(path, str) and path.startswith(SCHEME)


def dataset_path(path: str, cache: Optional[Path] = None) -> Path:
    """The cached file that ``dataset:NAME/FILE`` names.

    Args:
        path: ``dataset:NAME/FILE``, e.g. ``dataset:rmd17_ethanol/rmd17_ethanol_train_01.extxyz``.
        cache: the cache folder (default :func:`cache_dir`).

    Raises:
        DatasetError: not of that form, an unknown data set, or a file the data set does not have.
        DatasetNotFetchedError: the data set is not in the cache; the message names ``mlip-uq data fetch NAME``.
    """
    name, _, file = path[len(SCHEME):].partition("/")
    if not name or not file:
        raise DatasetError(f"{path!r}: a data-set path is {SCHEME}NAME/FILE, e.g. "
                           f"{SCHEME}rmd17_ethanol/rmd17_ethanol_train_01.extxyz")
    spec = get(name)
    if file not in spec.files:
        raise DatasetError(f"{path!r}: data set {name} has no file {file!r}; its files: {', '.join(spec.files)}")
    cache = cache_dir() if cache is None else Path(cache)
    target = cache / name / file
    if not target.is_file():
        raise DatasetNotFetchedError(
            f"{path}: data set {name} is not in the cache {cache} ({target} does not exist); fetch it with "
            f"`{fetch_command(name)}` (or set {CACHE_ENV} to the cache folder that holds it)")
    return target


def is_fetched(name: str, cache: Optional[Path] = None) -> bool:
    """Whether every file of data set ``name`` is in the cache."""
    folder = (cache_dir() if cache is None else Path(cache)) / name
    return all((folder / file).is_file() for file in get(name).files)


# --- verification ----------------------------------------------------------------------------------------------

def sha256_file(path: Union[str, Path]) -> str:
    """The SHA-256 (hex) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_fingerprint(frames: Sequence) -> str:
    """SHA-256 over each frame's atomic numbers, positions (Å), cell (Å), pbc, energy (eV) and forces (eV/Å), the
    numbers rounded to 1e-5, so that two files of the same structures and labels printed differently agree.

    Args:
        frames: ``ase.Atoms`` with their labels in ``atoms.calc`` (absent labels are hashed as absent).

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()

    def add(tag: str, value) -> None:
        value = np.round(np.ascontiguousarray(value, dtype=np.float64), 5) + 0.0  # + 0.0: -0.0 -> 0.0
        digest.update(f"{tag}{value.shape}".encode())
        digest.update(value.tobytes())

    for atoms in frames:
        digest.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
        add("positions", atoms.positions)
        add("cell", atoms.cell.array)
        digest.update(np.ascontiguousarray(atoms.pbc, dtype=np.bool_).tobytes())
        results = atoms.calc.results if atoms.calc is not None else {}
        for name in ("energy", "forces"):
            if name in results:
                add(name, results[name])
            else:
                digest.update(f"{name}:absent".encode())
    return digest.hexdigest()


def describe_file(path: Union[str, Path]) -> ConvertedFile:
    """The frame count and :func:`content_fingerprint` of an extended-XYZ file (what :data:`REGISTRY` records)."""
    import ase.io

    frames = ase.io.read(path, ":", format="extxyz")
    return ConvertedFile(frames=len(frames), fingerprint=content_fingerprint(frames))


def verify_file(path: Path, expected: ConvertedFile, what: str) -> None:
    """Check a converted file's frame count and fingerprint.

    Raises:
        DatasetError: either differs (the error names the file and both values).
    """
    found = describe_file(path)
    if found != expected:
        raise DatasetError(f"{what}: the converted file {path.name} does not match the registry: "
                           f"{found.frames} frames, fingerprint {found.fingerprint}; expected {expected.frames} "
                           f"frames, fingerprint {expected.fingerprint}")


# --- download --------------------------------------------------------------------------------------------------

def download(url: str, target: Path, sha256: Optional[str] = None, timeout_s: float = 60.0) -> str:
    """Download ``url`` to ``target`` through ``target.partial``, renamed onto ``target`` only when the download is
    complete (and its SHA-256 is ``sha256``, where given).

    Args:
        url: ``https://``, ``http://`` or ``file://`` URL.
        target: the file to write.
        sha256: the expected SHA-256 (hex), or None to accept any content.
        timeout_s: the socket timeout (s).

    Returns:
        The SHA-256 of the downloaded file.

    Raises:
        DatasetError: the download failed or was cut short (fewer bytes than the server announced), or its
            checksum differs; ``target.partial`` is removed and ``target`` is not written.
    """
    partial = target.with_name(target.name + ".partial")
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as handle:
            length = response.headers.get("Content-Length")
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
            if length is not None and received != int(length):
                raise DatasetError(f"download of {url} was cut short: {received} of {length} bytes received")
            handle.flush()
            os.fsync(handle.fileno())
    except DatasetError:
        partial.unlink(missing_ok=True)
        raise
    except (OSError, ValueError, EOFError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts,
        # a connection cut mid-stream (IncompleteRead), a malformed URL
        partial.unlink(missing_ok=True)
        raise DatasetError(f"download of {url} failed after {received} bytes: {e}") from e
    found = digest.hexdigest()
    if sha256 is not None and found != sha256.lower():
        partial.unlink(missing_ok=True)
        raise DatasetError(f"download of {url}: SHA-256 {found} differs from the registry's {sha256} (the file "
                           "was removed; the source has changed or the download is corrupt)")
    os.replace(partial, target)
    return found


def fetch(name: str, cache: Optional[Path] = None, force: bool = False, source: Optional[Path] = None,
          log: Callable[[str], None] = lambda message: None) -> Path:
    """Download, verify and convert data set ``name`` into ``<cache>/<name>/``.

    Args:
        name: a :data:`REGISTRY` name.
        cache: the cache folder (default :func:`cache_dir`).
        force: fetch again even if the cache holds the data set (the earlier copy is replaced only once the new
            one is verified).
        source: instead of downloading, copy the converted files from this folder (a copy made earlier, e.g. on
            another machine); they are verified the same way.
        log: receives one line per step (the command line prints them).

    Returns:
        The data set's folder in the cache.

    Raises:
        DatasetError: an unknown name, a failed, interrupted or corrupt download, or a converted file that does
            not match the registry; nothing is left in the cache (an earlier copy stays as it was).
    """
    spec = get(name)
    cache = cache_dir() if cache is None else Path(cache)
    final = cache / name
    if is_fetched(name, cache) and not force:
        log(f"{name}: already in {final}")
        return final
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f".{name}.partial"
    shutil.rmtree(work, ignore_errors=True)  # what an earlier interrupted fetch left
    converted = work / name
    converted.mkdir(parents=True)
    try:
        if source is not None:
            for file in spec.files:
                if not (Path(source) / file).is_file():
                    raise DatasetError(f"{name}: {Path(source) / file} does not exist (--from names a folder that "
                                       f"holds {', '.join(spec.files)})")
                shutil.copyfile(Path(source) / file, converted / file)
            log(f"{name}: copied {len(spec.files)} file(s) from {source}")
        else:
            paths = {}
            for item in spec.downloads:
                log(f"{name}: downloading {item.url}")
                found = download(item.url, work / item.name, item.sha256)
                log(f"{name}: {item.name} sha256 {found}" + (" (verified)" if item.sha256 else
                                                            " (not in the registry: not verified)"))
                paths[item.name] = work / item.name
            try:
                spec.convert(paths, converted)
            except DatasetError:
                raise
            except Exception as e:  # a download that is not what the converter reads (e.g. an HTML error page)
                raise DatasetError(f"{name}: converting the downloaded files failed ({type(e).__name__}: {e}); "
                                   "the source may have changed") from e
        for file, expected in spec.files.items():
            verify_file(converted / file, expected, name)
        log(f"{name}: {len(spec.files)} file(s) verified (frame counts and content fingerprints)")
        old = cache / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(converted, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


# --- the registry ----------------------------------------------------------------------------------------------

_RMD17_COMMIT = "4f6bb0a186822c90d47cd98b7a27991fe0b3173b"
_RMD17_URL = f"https://raw.githubusercontent.com/andersx/rmd17-npz/{_RMD17_COMMIT}/rmd17-npz/"
#: frame count and content fingerprint of each converted rMD17 file (split 01), from the copy the benchmarks used
_RMD17_FILES: Dict[str, Tuple[int, str]] = {
    "rmd17_aspirin_test_01.extxyz": (1000, "d4d242450482893a7c6d8037dcb7f5fdce6ef169d6accaa2a054c5e8fa02e02a"),
    "rmd17_aspirin_train_01.extxyz": (1000, "c28a794ac333c30f67d26dca81dffba20b5c6f6bd124d486ee476f4c1e0cb7c9"),
    "rmd17_azobenzene_test_01.extxyz": (1000, "bdb03f0b7ef17200e764c9580e8beaf60b0063d163ed251ecd49c220224acd7b"),
    "rmd17_azobenzene_train_01.extxyz": (1000, "41dcb211abef45fb74fec887e92be48949e5c454e19f7bdcd64b2157221b697a"),
    "rmd17_benzene_test_01.extxyz": (1000, "09ad40f0489333008f627de8aed087189223669642234b772911f1f1143a53f4"),
    "rmd17_benzene_train_01.extxyz": (1000, "3af93d24a0509030d00fc7595d5eff5d500d63f6ea6d4f5d1a1e9e35547d1c7e"),
    "rmd17_ethanol_test_01.extxyz": (1000, "d47992c442b94205210183f87d77e8fd0809f6b5542565fa75270a1b7ede3336"),
    "rmd17_ethanol_train_01.extxyz": (1000, "722d1e94b25deb175568c1385b356f5864022f15f54133ff716026f045c361a4"),
    "rmd17_malonaldehyde_test_01.extxyz": (1000, "3b1185135dfcd67851ab49671aa9cf29749627b3c80891fc1f9beecee4064d3d"),
    "rmd17_malonaldehyde_train_01.extxyz": (1000, "d80e41dcf09d2d453cead99e5ae9eb2eaea7b012637659d49b2604e4de061577"),
    "rmd17_naphthalene_test_01.extxyz": (1000, "6f84c8116a67184678dfc670f42fe2738c029391693bbaee874a67be8efb58b3"),
    "rmd17_naphthalene_train_01.extxyz": (1000, "5e7e252c0023095f688b6152e1afd1de8a94c9705832fd652f379fa28adec0eb"),
    "rmd17_paracetamol_test_01.extxyz": (1000, "764a652f05445730e367a89c93b10020d63e5be09fff971987a58e12880a5e76"),
    "rmd17_paracetamol_train_01.extxyz": (1000, "a0d7320e530a6094e83a7407de8090527a4ea5957ec7e70d9d3b01b51c4509f2"),
    "rmd17_salicylic_test_01.extxyz": (1000, "3e8dae4e7a11f885235c860047ed6f237c355f8ccd8d9c5985a52437cf7a9228"),
    "rmd17_salicylic_train_01.extxyz": (1000, "8a29865b2d4bd009b6d25ac0962333a93c13d42a44c8f98b16d24f802601be8f"),
    "rmd17_toluene_test_01.extxyz": (1000, "bf23672baf9289e2c56300aa254f659b8881c22f494ffd7e74ed5ba327f95dc0"),
    "rmd17_toluene_train_01.extxyz": (1000, "75ce26f91765fe81a8a99e5e7a6ef6aae0f3dc95d4bd13503dfff48f0be069f1"),
    "rmd17_uracil_test_01.extxyz": (1000, "98c7a75f2c854faf3cdc817dfd12a3a226bda184600871473cbc9ec98b1ecab0"),
    "rmd17_uracil_train_01.extxyz": (1000, "9f141281d62e734458f84c99e2eaa68fcec06a964352eee659bc7e1483ed6d01"),
}

_PSIK_COMMIT = "cddb423d0c6a7b9cff1de4826e71012a3de37dca"
_BOTNET_COMMIT = "29e6d467317e4b5967b7ea5cbee54de953fa0d45"
_BOTNET_URL = f"https://raw.githubusercontent.com/davkovacs/BOTNet-datasets/{_BOTNET_COMMIT}/dataset_acac/"
#: SHA-256, frame count and content fingerprint of each acetylacetone file (distributed as extended XYZ)
_ACAC_FILES: Dict[str, Tuple[str, int, str]] = {
    "isolated_atoms.xyz": ("b74f321b453374621b447d65c60979f70df1b7182c8ee0215388b2c574f33823",
        3, "85b266f87c48293388ce0c6445b286087ab478962a7cca818fe36df74453c122"),
    "test_H_transfer.xyz": ("ea4d76c79cf4cfccd2f93eaf755172b0b648886c4907eb0f82dff07a77530743",
        15, "0247b43527a5ee43a7c543391848e162b4f130f89d7a69b12b66a658c0233242"),
    "test_MD_300K.xyz": ("2291f3186a3cc6a5e05e92952c84a9237ca53f862d78fd3316a769360719ec43",
        650, "d08285e67659fe0e3f7aa54d1a950efd5395afa60646d08a7acb68dd8e0313b1"),
    "test_MD_600K.xyz": ("d5a5bba154ec43f915eb7529f86ec3af60e6f911743859daba030181a0378ff7",
        650, "824abc3a2c1ebac0bf0bd0f80c26c60ae99b9c337b00d573d632928c636da743"),
    "test_dihedral.xyz": ("0c2246a593579de5a4450698d5f4ba5802b095824b7f211aa5889339967c6809",
        45, "79c531911c3a0e10fe0c9000bd569a8c78de39ff84ef5aefe873d77569d5daf8"),
    "train_300K.xyz": ("8f5706d6902360555a5be59395612d2afc3489a75688388a58e7275fdad68af3",
        500, "15b811f96c5858b29193fd91dc1233ccf5b72846ff16c021b25787e31513ed51"),
    "train_600K.xyz": ("180c2538508f7810a623c279426f44953ee7cfb2af77e48ea3986ff97645a71c",
        500, "b4da967e1b7f2fb5e908e6d38d0a31b946d99128a21f844df4b318a90a51a38e"),
}
_TIO2_FILE: Tuple[int, str] = (7815, "b009f93aa30d8cb662b02383adf6534604b1de8a282652560d5c100bff7ffb9e")

_UNVERIFIED = ("The upstream files' SHA-256 is not recorded: the source could not be reached when this entry "
               "was written. The converted files are verified by their frame counts and content fingerprints, "
               "computed from the copy of the data set the project's benchmarks used.")


def _rmd17(molecule: str) -> DataSet:
    names = [f"rmd17_{molecule}_{split}_01" for split in ("train", "test")]
    return DataSet(
        name=f"rmd17_{molecule}",
        description=f"revised MD17 {molecule}, official split 01: 1,000 train + 1,000 test structures, PBE/def2-SVP",
        source=f"github.com/andersx/rmd17-npz, commit {_RMD17_COMMIT}, rmd17-npz/*_01.npz "
               "(data of figshare doi:10.6084/m9.figshare.12672038)",
        licence="CC0-1.0",
        citation="A. S. Christensen and O. A. von Lilienfeld, Mach. Learn.: Sci. Technol. 1, 045018 (2020)",
        downloads=tuple(Download(f"{n}.npz", f"{_RMD17_URL}{n}.npz") for n in names),
        convert=convert_rmd17_npz,
        files={f"{n}.extxyz": ConvertedFile(*_RMD17_FILES[f"{n}.extxyz"]) for n in names},
        note=_UNVERIFIED,
    )


def _build_registry() -> Dict[str, DataSet]:
    registry = {}
    for molecule in ("aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde", "naphthalene", "paracetamol",
                     "salicylic", "toluene", "uracil"):
        entry = _rmd17(molecule)
        registry[entry.name] = entry
    registry["tio2_aenet"] = DataSet(
        name="tio2_aenet",
        description="TiO2 reference set of Artrith & Urban (aenet), all 7,815 periodic structures, PBE",
        source=f"github.com/atomisticnet/psi-k-mlip-workshop-2021, commit {_PSIK_COMMIT}, xsf/structure*.xsf "
               "(also distributed as data-set-2016-TiO2.tar.bz2 on ann.atomistic.net)",
        licence="no licence file; the authors' publicly distributed research data (cite the paper)",
        citation="N. Artrith and A. Urban, Comput. Mater. Sci. 114, 135-150 (2016)",
        downloads=(Download("psi-k-mlip-workshop-2021.tar.gz",
                            f"https://github.com/atomisticnet/psi-k-mlip-workshop-2021/archive/{_PSIK_COMMIT}.tar.gz"),),
        convert=convert_aenet_xsf_archive,
        files={"tio2_aenet_7815.extxyz": ConvertedFile(*_TIO2_FILE)},
        note=_UNVERIFIED + " (GitHub does not promise byte-stable archives, so only the content is checked.)",
    )
    registry["botnet_acac"] = DataSet(
        name="botnet_acac",
        description="acetylacetone: train 300 K / 600 K, test MD 300 K / 600 K, H transfer, dihedral scan "
                    "(PBE+D3/def2-SVP)",
        source=f"github.com/davkovacs/BOTNet-datasets, commit {_BOTNET_COMMIT}, dataset_acac/",
        licence="MIT",
        citation="I. Batatia et al., The Design Space of E(3)-Equivariant Atom-Centered Interatomic Potentials, "
                 "arXiv:2205.06643",
        downloads=tuple(Download(file, f"{_BOTNET_URL}{file}", sha) for file, (sha, _, _) in _ACAC_FILES.items()),
        convert=copy_files,
        files={file: ConvertedFile(frames, fingerprint) for file, (_, frames, fingerprint) in _ACAC_FILES.items()},
        note="The SHA-256 of each file is that of the byte-for-byte copy the project's benchmarks used (not "
             "checked against the source from here).",
    )
    return registry


#: every data set ``mlip-uq data fetch`` knows, by name
REGISTRY: Dict[str, DataSet] = _build_registry()


def list_lines(cache: Optional[Path] = None) -> str:
    """``mlip-uq data list``: one line per data set (name, fetched or not, description), then the cache folder."""
    cache = cache_dir() if cache is None else Path(cache)
    lines = [f"{name:22s} {'fetched' if is_fetched(name, cache) else '-':8s} {spec.description}"
             for name, spec in REGISTRY.items()]
    return "\n".join([*lines, f"cache: {cache} (set {CACHE_ENV} to change it)"])

