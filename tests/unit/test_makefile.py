"""``make install``: which torch it installs (TORCH=cpu|cuda), checked by its dry run (``make -n``) and by running
it with a stand-in Python that records the pip calls instead of downloading anything."""

import os
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STUB = """#!/bin/sh
# a stand-in for python: records its arguments; `-c "import torch"` succeeds when HAS_TORCH is set, `pip install
# --no-index` (a wheel the machine holds) when LOCAL_WHEEL is set, every other pip call succeeds
echo "$*" >> "$CALLS"
case "$*" in
  "-c import torch") [ -n "$HAS_TORCH" ] ;;
  *--no-index*) [ -n "$LOCAL_WHEEL" ] ;;
  *) exit 0 ;;
esac
"""


def make(*args, **env):
    """``make -C REPO_ROOT *args``, without the variables of a ``make`` this test may run under (``make test``
    passes its command-line variables, e.g. TORCH=cuda, to sub-makes through MAKEFLAGS)."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO_ROOT), *args], capture_output=True,
                          text=True, env={**inherited, **env})


def test_dry_run_cpu_tries_a_local_wheel_then_the_cpu_index_and_installs_the_test_extras():
    result = make("-n", "install", "PYTHON=python")
    assert result.returncode == 0, result.stderr
    torch_line, package_line = result.stdout.strip().splitlines()
    assert torch_line.startswith('python -c "import torch" 2>/dev/null || ')  # an installed torch is kept
    assert "pip install --quiet --no-index torch==2.13.0" in torch_line
    assert f"pip install --quiet --index-url {CPU_INDEX} torch==2.13.0" in torch_line
    assert package_line == "python -m pip install --quiet -e '.[test]'"


def test_dry_run_cuda_takes_the_default_pypi_build():
    result = make("-n", "install", "PYTHON=python", "TORCH=cuda")
    torch_line = result.stdout.strip().splitlines()[0]
    assert torch_line.endswith("{ python -m pip install --quiet torch==2.13.0; }")
    assert "--index-url" not in torch_line and "--no-index" not in torch_line


def test_an_unknown_torch_variant_is_refused():
    result = make("-n", "install", "TORCH=rocm")
    assert result.returncode != 0 and "use TORCH=cpu" in result.stderr


@pytest.mark.parametrize("torch_kind, state, expected", [
    ("cpu", {"HAS_TORCH": "1"}, []),  # kept
    ("cuda", {"HAS_TORCH": "1"}, []),
    ("cpu", {"LOCAL_WHEEL": "1"}, ["-m pip install --quiet --no-index torch==2.13.0"]),  # e.g. a wheel folder
    ("cpu", {}, ["-m pip install --quiet --no-index torch==2.13.0",  # an ordinary machine: the CPU index
                 f"-m pip install --quiet --index-url {CPU_INDEX} torch==2.13.0"]),
    ("cuda", {}, ["-m pip install --quiet torch==2.13.0"]),
])
def test_install_runs_the_pip_calls_of_its_torch_variant(tmp_path, torch_kind, state, expected):
    stub, calls = tmp_path / "python", tmp_path / "calls.txt"
    stub.write_text(STUB)
    stub.chmod(0o755)
    result = make("install", f"PYTHON={stub}", f"TORCH={torch_kind}", CALLS=str(calls), **state)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["-c import torch", *expected, "-m pip install --quiet -e .[test]"]
