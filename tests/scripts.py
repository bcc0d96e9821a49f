"""Load a script of the repository's examples/ or benchmarks/ (not a package) as a module, for
the tests of its functions."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str | None = None) -> ModuleType:
    """The module of ``ROOT / relative`` (e.g. ``"benchmarks/gemm.py"``), registered in
    ``sys.modules`` under ``name`` (default: the file's stem) so dataclasses can find it."""
    path = ROOT / relative
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module
