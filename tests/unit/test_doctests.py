"""The docstring examples of the small utilities run as doctests (kept to modules that import quickly)."""

import doctest
import importlib

import pytest

MODULES = [
    "mlip_uq.files",
    "mlip_uq.settings",
    "mlip_uq.config",
    "mlip_uq.inference.common",
    "mlip_uq.inference.options",
    "mlip_uq.inference.schedule",
    "mlip_uq.inference.diagnostics",
    "mlip_uq.inference.sghmc",
    "mlip_uq.uq.metrics",
    "mlip_uq.uq.signals",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
