"""The kernel-configuration table of the CUTLASS backend: the one place that lists kernels.

``generate_kernels.py`` (run by CMake) emits one ``.cu`` file per row and the Python
dispatcher (``dispatch.py``) chooses among the rows that were built. Each row states the M range
it is the default for; the per-shape autotuner (``benchmarks/gemm.py --tuned-out``) can override the
default with measured choices stored as data in ``tuned_sm90.json``.

Rows must keep their names stable: the names are the C symbols and the keys of the tuned table.

Example::

    >>> from qfx.backends.cutlass.configs import CONFIGS
    >>> [c.name for c in CONFIGS if c.arch == "sm90a"][:1]
    ['sm90_s8_pp_64x64x128_c1x1']
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KernelConfig", "CONFIGS", "ARCH_GROUPS", "PTX_ARCH", "by_name", "configs_for"]

# CUDA architectures each config family is compiled for (SASS for each one asked for);
# "90a" needs the arch-specific target because wgmma only exists there.
ARCH_GROUPS = {
    "sm90a": ("90a",),
    "sm80": ("80", "86", "89"),
}
# PTX embedded per family: the sm80 kernels ship compute_80 PTX so that a Hopper can JIT and
# check them (never time them there: s4 mma is emulated on sm_90).
PTX_ARCH = {"sm80": "80"}

# Unbounded upper end of an M range.
M_MAX = 1 << 31


@dataclass(frozen=True)
class KernelConfig:
    """One kernel instantiation.

    Attributes:
        name: C symbol prefix and stable key (``qfx_<name>_s32`` etc.).
        arch: key of :data:`ARCH_GROUPS`.
        operand: ``"s8"`` (int8 x int8) or ``"s4"`` (packed int4 x int4).
        tile: CTA tile (M, N, K) in elements.
        cluster: thread-block cluster (M, N, 1); sm90 only, (1, 1, 1) elsewhere.
        schedule: ``"cooperative"`` (two consumer warpgroups split one tile, persistent),
            ``"pingpong"`` (two consumer warpgroups alternate tiles so one's epilogue overlaps
            the other's mainloop, persistent) or ``"multistage"`` (CUTLASS 2.x, sm80).
        scheduler: sm90 tile scheduler: ``"persistent"`` (one CTA per SM walks output tiles) or
            ``"streamk"`` (splits the K loop of the last wave across idle SMs, fixing the
            few-tiles problem of small M; needs a workspace; cooperative only).
        warp: warp tile (sm80 only).
        stages: pipeline depth (sm80 only; sm90 takes the most that fit in shared memory).
        m_range: [lo, hi) rows of A this config is the untuned default for.
        why: one line on when it pays.
        splits: split-K factor (stream-K kernels only): K is cut into ``splits`` slices run by
            separate CTAs and reduced through the workspace; 1 lets CUTLASS's heuristic pick
            stream-K or data-parallel.
        epi_tile: sm90 epilogue subtile (M, N) the output is stored in, one TMA store each;
            None lets CUTLASS choose (64 x 32 for a ping-pong warpgroup's fp16 tile: 8 subtiles
            of a 128 x 128 tile, each with its own barrier and store). Ping-pong takes M = 64,
            cooperative M = 128 (CUTLASS's rule); N a multiple of 16 dividing the tile's.
    """

    name: str
    arch: str
    operand: str
    tile: tuple[int, int, int]
    cluster: tuple[int, int, int] = (1, 1, 1)
    schedule: str = "cooperative"
    scheduler: str = "persistent"
    warp: tuple[int, int, int] | None = None
    stages: int | None = None
    m_range: tuple[int, int] = (0, M_MAX)
    why: str = ""
    splits: int = 1
    epi_tile: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.epi_tile is not None:
            m, n = self.epi_tile
            want_m = {"pingpong": 64, "cooperative": 128}.get(self.schedule)
            if self.arch != "sm90a" or m != want_m or n % 16 or self.tile[1] % n or self.tile[0] % m:
                raise ValueError(f"config {self.name}: epi_tile {self.epi_tile} does not fit a {self.schedule} "
                                 f"{self.tile} tile; sm90 ping-pong takes (64, N), cooperative (128, N), N a "
                                 "multiple of 16 dividing the tile's N")

    @property
    def symbol(self) -> str:
        """C symbol prefix of the compiled kernel; rows differing only in ``splits`` share it."""
        suffix = f"_split{self.splits}"
        return self.name[: -len(suffix)] if self.name.endswith(suffix) else self.name

    @property
    def k_align(self) -> int:
        """Elements of K per 16-byte row chunk (TMA / cp.async need 16-byte rows)."""
        return 16 * 8 // (4 if self.operand == "s4" else 8)

    @property
    def n_align(self) -> int:
        """N granularity: 8 keeps fp16 and int32 output rows 16-byte aligned."""
        return 8


def _sm90(tile, cluster, schedule, m_range, why, scheduler="persistent", splits=1, epi_tile=None):
    tag = {"cooperative": "co", "pingpong": "pp"}[schedule]
    name = f"sm90_s8_{tag}_{'x'.join(map(str, tile))}_c{cluster[0]}x{cluster[1]}"
    if epi_tile is not None:
        name += f"_e{epi_tile[0]}x{epi_tile[1]}"
    if scheduler == "streamk":
        name += "_sk" + (f"_split{splits}" if splits > 1 else "")
    return KernelConfig(name, "sm90a", "s8", tile, cluster, schedule, scheduler,
                        m_range=m_range, why=why, splits=splits, epi_tile=epi_tile)


def _sm80(operand, tile, warp, stages, m_range, why):
    name = f"sm80_{operand}_{'x'.join(map(str, tile))}_w{'x'.join(map(str, warp))}_s{stages}"
    return KernelConfig(name, "sm80", operand, tile, (1, 1, 1), "multistage", "persistent", warp,
                        stages, m_range, why)


# Rows sorted by arch, then by the M range they serve. int8 tiles take K = 128 (one 128-byte
# swizzle row per stage). Measured and dropped (benchmarks/RESULTS.md): 64x128 ping-pong (64x64
# wins at small M), 256x128 with a 2x1 cluster, and stream-K / split-K x2-4 on 128x64 and
# 128x128 tiles (a ~10 us floor at small M, twice the 64x64 ping-pong kernel), 64x256 ping-pong
# (1x1 and 2x1 clusters) and 128x256 cooperative without a cluster (never clearly best).
CONFIGS: tuple[KernelConfig, ...] = (
    _sm90((64, 64, 128), (1, 1, 1), "pingpong", (0, 256), "small M: 64x64 tiles give the most CTAs; latency-bound region"),
    _sm90((64, 32, 128), (1, 1, 1), "pingpong", (0, 0),
          "tiny M, narrow N (attn-out at M=128): twice the CTAs of 64x64: tuned choice only"),
    _sm90((128, 128, 128), (1, 1, 1), "cooperative", (256, 2048), "mid M and the fallback: the most general shape, always compiled"),
    _sm90((128, 128, 128), (2, 1, 1), "pingpong", (2048, M_MAX),
          "large M: one warpgroup's epilogue hides under the other's mainloop (short K); "
          "the 2-CTA cluster multicasts the B tile"),
    _sm90((128, 128, 128), (1, 1, 1), "pingpong", (0, 0), "large M, long K (FFN-out): tuned choice only"),
    _sm90((128, 128, 128), (1, 2, 1), "pingpong", (0, 0), "large M: cluster along N multicasts the A tile: tuned choice only"),
    _sm90((256, 128, 128), (1, 1, 1), "cooperative", (0, 0), "large M, narrow N: tuned choice only"),
    _sm90((128, 256, 128), (2, 1, 1), "cooperative", (0, 0),
          "large M, wide N: largest tile, highest arithmetic intensity: tuned choice only"),
    # Short K (BERT's qkv / attn-out / FFN-in, K = 768-1024: 6-8 K blocks a tile) leaves each
    # tile's epilogue a large share (issue 23: those roles at 37-50 % of INT8 peak, FFN-out with
    # K = 3072 at 70 %). Fewer, larger epilogue subtiles mean fewer barriers and TMA stores per
    # tile; candidates for the tuner (benchmarks/device_run.sh tune-short-k), not yet measured.
    _sm90((128, 128, 128), (2, 1, 1), "pingpong", (0, 0), "large M, short K: 2 epilogue subtiles: tuned choice only",
          epi_tile=(64, 128)),
    _sm90((128, 128, 128), (1, 1, 1), "pingpong", (0, 0), "large M: 2 epilogue subtiles: tuned choice only",
          epi_tile=(64, 128)),
    _sm90((256, 128, 128), (1, 1, 1), "cooperative", (0, 0), "large M, narrow N: 2 epilogue subtiles: tuned choice only",
          epi_tile=(128, 64)),
    _sm80("s4", (128, 256, 128), (64, 64, 128), 3, (2048, M_MAX), "INT4 mma m16n8k64, large tile"),
    _sm80("s4", (128, 128, 128), (64, 64, 128), 4, (0, 2048), "INT4 mma m16n8k64, small M"),
    _sm80("s8", (128, 256, 64), (64, 64, 64), 3, (2048, M_MAX), "INT8 mma m16n8k32, large tile"),
    _sm80("s8", (128, 128, 64), (64, 64, 64), 4, (0, 2048), "INT8 mma m16n8k32, small M"),
)

FALLBACK = {"sm90a": "sm90_s8_co_128x128x128_c1x1"}  # any M, N % 8, K % 16


def by_name(name: str) -> KernelConfig:
    """The row called ``name``; KeyError lists the valid names."""
    for c in CONFIGS:
        if c.name == name:
            return c
    raise KeyError(f"no kernel config {name!r}; known: {[c.name for c in CONFIGS]}")


def configs_for(arch: str, operand: str) -> list[KernelConfig]:
    """Rows of one arch family and operand type, table order."""
    return [c for c in CONFIGS if c.arch == arch and c.operand == operand]
