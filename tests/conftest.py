"""Shared test fixtures: paths to the public data sets in ../shared/data and small frame sets."""

import os
from pathlib import Path

import pytest
from nequip.utils.global_state import set_global_state

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MLIP_UQ_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
BUNDLED_TIO2 = REPO_ROOT / "data" / "tio2_aenet_subset_1000.extxyz"

# nequip models are built under its global state (default dtype float64)
set_global_state()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data sets not found at {SHARED_DATA}; set MLIP_UQ_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tio2_path() -> Path:
    """The bundled 1,000-structure aenet TiO2 subset (MIT, shipped in data/)."""
    return BUNDLED_TIO2
