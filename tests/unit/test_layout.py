"""The package's layout: no module over 500 lines, and no import-time circle between the configuration and the
training methods."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mlip_uq"
MAX_LINES = 500


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_exceeds_500_lines(path):
    n_lines = len(path.read_text(encoding="utf-8").splitlines())
    assert n_lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {n_lines} lines (at most {MAX_LINES})"


def _modules_after_import(module: str) -> list:
    """The ``mlip_uq`` modules that ``import module`` loads in a fresh interpreter."""
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'mlip_uq' or m.startswith('mlip_uq.'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_config_and_inference_import_without_a_circle():
    """``mlip_uq.config`` reads the method table (the package ``mlip_uq.inference``, which imports no method) and
    loads a method's module only when a configuration names it (``importlib``, :meth:`Method.load`); the method
    modules import ``mlip_uq.config``. So at import time the dependency runs one way."""
    loaded = _modules_after_import("mlip_uq.config")
    assert "mlip_uq.inference" in loaded
    assert [m for m in loaded if m.startswith("mlip_uq.inference.")] == []
    assert "mlip_uq.config" not in _modules_after_import("mlip_uq.inference")
