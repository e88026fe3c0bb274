"""The package's layout: no module over 500 lines; the typed settings on the ground floor, and no import circle
between the configuration and the training methods."""

import ast
import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mlip_uq"
MAX_LINES = 500


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_exceeds_500_lines(path):
    n_lines = len(path.read_text(encoding="utf-8").splitlines())
    assert n_lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {n_lines} lines (at most {MAX_LINES})"


def _modules_after_import(*modules: str) -> list:
    """The ``mlip_uq`` modules that importing ``modules`` loads in a fresh interpreter."""
    code = (f"import json, sys; import {', '.join(modules)}; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'mlip_uq' or m.startswith('mlip_uq.'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _static_imports() -> dict:
    """Module -> the ``mlip_uq`` modules it imports anywhere in its text (functions included), read from the source;
    a submodule's parent packages count as imported (their ``__init__`` runs first), but for ``mlip_uq`` itself,
    whose names are imported lazily."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets.add(module)
                targets.update(f"{module}.{a.name}" for a in node.names)  # ``from . import calculator``
        graph[name] = set()
        for target in targets:
            parts = target.split(".")
            graph[name].update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    modules = set(graph)
    return {name: {t for t in targets if t in modules and t != name} for name, targets in graph.items()}


def _reachable(graph: dict, start: str) -> set:
    seen, queue = set(), deque([start])
    while queue:
        for target in graph[queue.popleft()]:
            if target not in seen:
                seen.add(target)
                queue.append(target)
    return seen


def test_the_typed_settings_are_the_ground_floor():
    """``mlip_uq.settings`` (``settings_from``, ``check_type``, ``ConfigError``) imports no other module of the
    package, so every layer may use it."""
    assert _static_imports()["mlip_uq.settings"] == set()


def test_no_import_leads_from_the_training_methods_to_the_configuration():
    """From the imports (read from the source, at any depth): no module of ``mlip_uq.inference`` reaches
    ``mlip_uq.config`` (nor what reads configurations: ``train``, ``compare``, ``active``), so the dependency
    between the configuration and the methods runs one way: config -> inference -> settings."""
    graph = _static_imports()
    above = {"mlip_uq.config", "mlip_uq.train", "mlip_uq.compare", "mlip_uq.cli"} | {
        m for m in graph if m.startswith("mlip_uq.active")}
    for module in sorted(m for m in graph if m == "mlip_uq.inference" or m.startswith("mlip_uq.inference.")):
        assert _reachable(graph, module) & above == set(), module
    assert "mlip_uq.inference" in graph["mlip_uq.config"]  # the method table, read by the configuration


def test_config_and_inference_import_without_a_circle():
    """At import time: ``mlip_uq.config`` loads the method table (the package ``mlip_uq.inference``, which
    imports no method) and loads a method's module only when a configuration names it; no method module loads
    ``mlip_uq.config``."""
    loaded = _modules_after_import("mlip_uq.config")
    assert [m for m in loaded if m.startswith("mlip_uq.inference.")] == []
    from mlip_uq.inference import METHODS

    methods = [m.module for m in METHODS.values() if isinstance(m.module, str)]
    assert "mlip_uq.inference.sgmcmc" in methods
    assert "mlip_uq.config" not in _modules_after_import(*methods)
