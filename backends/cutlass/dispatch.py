"""Chooses a kernel config per GEMM shape: tuned choice if measured, else the table's M range.

The tuned table (``tuned_sm90.json``) is data written by ``benchmarks/gemm.py --tune``: for a
(N, K, M-bucket) it names the fastest config measured. Shapes it does not list fall back to the
config whose ``m_range`` holds M, then to :data:`configs.FALLBACK`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from .configs import CONFIGS, FALLBACK, KernelConfig, by_name

__all__ = ["m_bucket", "choose", "tuned_table", "TUNED_PATH"]

TUNED_PATH = Path(__file__).resolve().parent / "tuned_sm90.json"
_MIN_BUCKET = 128  # below this every shape is latency-bound: one bucket serves all


def m_bucket(m: int) -> int:
    """The power of two >= m (at least 128) that M is tuned under."""
    b = _MIN_BUCKET
    while b < m:
        b *= 2
    return b


@functools.lru_cache(maxsize=4)
def tuned_table(path: Path = TUNED_PATH) -> dict[tuple[int, int, int], str]:
    """{(N, K, m_bucket): config name}; empty when nothing was tuned yet."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {(e["n"], e["k"], e["m_bucket"]): e["config"] for e in data.get("entries", [])}


def _nearest_tuned(n: int, k: int, bucket: int) -> str | None:
    """Tuned config for (n, k) at the largest tuned bucket <= ``bucket`` (else the smallest)."""
    buckets = sorted(b for (tn, tk, b) in tuned_table() if (tn, tk) == (n, k))
    if not buckets:
        return None
    below = [b for b in buckets if b <= bucket]
    return tuned_table()[(n, k, below[-1] if below else buckets[0])]


def choose(family: str, operand: str, m: int, n: int, k: int,
           built: set[str]) -> KernelConfig | None:
    """The config to run for this shape among those ``built``; None if none fits."""
    if family == "sm90a":
        name = _nearest_tuned(n, k, m_bucket(m))
        if name in built:
            return by_name(name)
    rows = [c for c in CONFIGS if c.arch == family and c.operand == operand and c.name in built
            and n % c.n_align == 0 and k % c.k_align == 0]
    for c in rows:
        if c.m_range[0] <= m < c.m_range[1]:
            return c
    fallback = FALLBACK.get(family)
    if fallback in built:
        return by_name(fallback)
    return rows[0] if rows else None
