"""Guard against importing a qfx *checkout* instead of the qfx package.

A checkout cloned as ``qfx/`` holds the package one level down (``qfx/qfx/``). Running a
script from the folder that contains the checkout puts that folder first on ``sys.path``, and
``import qfx`` would then find the checkout itself. Without this file it became an empty
namespace package (``module 'qfx' has no attribute 'prepare_qat'``), because the editable
install's finder runs after the path-based one. With it, ``import qfx`` lands here, and this
module hands over to the real package: the installed one, or the one inside this checkout.

Nothing here runs when qfx is imported normally (this file is not part of the package).
"""
import importlib
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_parent = os.path.dirname(_here)


def _is_parent(entry: str) -> bool:
    return os.path.abspath(entry or os.getcwd()) == _parent


if __name__ == "qfx":
    _saved = list(sys.path)
    del sys.modules[__name__]
    # Look for qfx without the folder that holds this checkout, then inside the checkout.
    sys.path[:] = [p for p in _saved if not _is_parent(p)]
    try:
        try:
            _real = importlib.import_module("qfx")
        except ImportError:
            sys.path.insert(0, _here)
            try:
                _real = importlib.import_module("qfx")
            except ImportError as e:
                raise ImportError(
                    f"'import qfx' found the qfx checkout {_here} (the current folder contains it), "
                    "and qfx is not installed: run `pip install -e .` inside the checkout, or run "
                    "your script from another folder"
                ) from e
    finally:
        sys.path[:] = _saved
    sys.modules["qfx"] = _real
