"""A roofline cost model of qfx's kernels for targets that are not present.

Each kernel's time is a fixed cost plus a smooth maximum of its compute time and its memory
time (an ``alpha``-norm: ``alpha = 1`` adds them, ``alpha -> inf`` is the pure roofline max)::

    t = fixed_us + (T_c^alpha + T_m^alpha)^(1/alpha)
    T_c = waves * (2 * tm * tn * K / (eff_c * peak / SMs) + tile_overhead)      (GEMMs)
    T_m = bytes / (eff_m * bandwidth)

A GEMM (M x N x K) is cut into ``tm x tn`` output tiles, one per SM per wave, ``waves = ceil(tiles / SMs)``: wave
quantisation is why a small M wastes most of a big GPU. The model takes the fastest tile of its family's set
(:data:`TILES_BY_FAMILY`); it does not choose among the backend's configs (the per-tile cost is proportional to the
tile's area, so the smallest tile always wins the wave count) and names the kernel only by family and operand
(``"cutlass sm80 s4"``). ``tile_overhead`` (pipeline fill, epilogue, tile switch) is counted in 128x128x128 INT8 MMA
steps of the target GPU's own SM, per 128x128 of output, and fitted per family (:data:`FIT`). Bytes: A (M x K) and W
(N x K) at the operand width (fp16 2, int8 1, int4 0.5 bytes) plus the output (fp16 2 bytes; int32 4 bytes for the
sm80 family, whose epilogue is a separate kernel today — backends/cutlass/__init__.py).

The peaks, bandwidth and SM count come from :mod:`qfx.targets` (vendor data sheets); only the efficiency factors in
:data:`FIT` are fitted. Hopper's ("sm90a") on the H100 measurements of the repository
(``qfx/tune/data/h100_gemm.json``, transcribed from benchmarks/RESULTS.md and
tests/units/data/h100_gemm_rn_epilogue.json), by :func:`qfx.tune.evidence.fit_gemm` (log-error least squares,
Nelder-Mead, all 48 BERT-base/large shapes, M = 128..65536):

* int (qfx int8 wgmma + fused dequant): eff_c 1.00, eff_m 1.00, alpha 1.19, fixed 4.9 us,
  tile overhead 1.72 MMA steps: max error 16.6 % at M >= 2048, 24 % below (M = 128-512).
* fp16 (cuBLAS ``torch.mm``): eff_c 0.81, eff_m 0.97, alpha 1.67, fixed 3.7 us: max error
  9.4 % at M >= 2048, 23 % below.

What it gets wrong below M = 2048: at M = 128-512 a GEMM is a handful of tiles on 132 SMs and its time is latency
(prologue, TMA descriptor fetch, the epilogue's dependent loads), which one fixed cost summarises only roughly: FFN-
out (K = 3072/4096) at M = 128 is predicted 20-24 % too fast (the measured kernel runs the long K loop on 8-16
CTAs), attention-out at M = 128 up to 14 % too slow. The int model's alpha near 1 says the fused-epilogue int8
kernel barely overlaps its output stores with the mainloop; eff_c = 1.0 sits at its bound, the losses being carried
by the per-tile overhead.

Ampere (sm_80/86, "sm80") and Ada (sm_89) have their own factors, fitted and checked on published Ampere/Ada
speedups only (:mod:`qfx.tune.evidence`, qfx/tune/data/published_ampere.json: TensorRT demoBERT, FasterTransformer,
the paper's Figure 1): nothing fitted on the H100 is transferred to them. Each published ratio is compared with the
model of the engine that was measured (:data:`PIPELINES`: whole forward for whole-model rows, the GEMM alone for
GEMM rows). All TensorRT and paper rows are reproduced within 25 % (23 % worst), held-out GPUs (A30, L40S, A10)
included; 24 FasterTransformer rows are not (``evidence.KNOWN_OUTSIDE`` says why). The ratios are validated, the
absolute microseconds on those GPUs are not. :func:`qfx.tune.evidence.trust_statement` says this for a plan.

Example::

    >>> from qfx.targets import get_target
    >>> est = gemm_time(get_target("sm_86"), 12288, 1024, 4096, "int4")
    >>> round(est.us), est.kernel
    (254, 'cutlass sm80 s4')
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from qfx.targets import Target, get_target
from qfx.tune.block_cost import (OFFSET_TERM_COST, SM_RATES, block_kernel_name, promotion_cost, promotion_ops,
                                  promotion_us)

__all__ = [
    "KernelFit", "FIT", "TILES", "GemmEstimate", "gemm_time", "quantize_time", "epilogue_time",
    "elementwise_time", "attention_time", "part_time", "fused_quantize_time", "QUANTIZE_IN_NORM", "PartEstimate", "ModelShape", "MODEL_SHAPES",
    "model_latency", "BYTES_PER_ELEMENT", "PIPELINES", "TILES_BY_FAMILY", "fit_for", "fit_key", "codes_bytes",
    "SM_RATES", "OFFSET_TERM_COST", "block_kernel_name", "promotion_ops", "promotion_cost", "promotion_us", "quantize_bytes",
]

#: bytes per element of each GEMM operand precision
BYTES_PER_ELEMENT = {"fp16": 2.0, "int8": 1.0, "int4": 0.5}

#: output tiles (tm, tn) the model chooses from: the sm90 table's shapes (backends/cutlass/configs.py)
TILES: tuple[tuple[int, int], ...] = ((64, 32), (64, 64), (128, 128), (128, 256), (256, 128))

#: INT8 work of one 128x128x128 MMA step, in ops: ``tile_overhead_steps`` counts the time of such
#: steps on the target GPU's SM
_STEP_OPS = 2 * 128 * 128 * 128


@dataclass(frozen=True)
class KernelFit:
    """Efficiency factors of one kernel kind of one family (:data:`FIT`; see the module docstring).

    Attributes:
        eff_compute: fraction of the dense tensor-core peak the mainloop reaches.
        eff_memory: fraction of the DRAM bandwidth streaming reaches.
        alpha: overlap of compute and memory time (1: none, large: perfect).
        fixed_us: per-kernel fixed cost (launch inside a CUDA graph, prologue, tail).
        tile_overhead_steps: per-output-tile cost in 128x128x128 MMA steps of the GPU's SM.
    """

    eff_compute: float
    eff_memory: float
    alpha: float
    fixed_us: float
    tile_overhead_steps: float = 0.0


#: Efficiency factors per kernel family (``Target.family``), each validated on its own evidence.
#: "sm90a" ("int" and "fp16"): fitted by :func:`qfx.tune.evidence.fit_gemm` on qfx/tune/data/h100_gemm.json (all M).
#: "memory" (LayerNorm, adds, copies, unfused epilogue) and "attention": assumed, not fitted
#: (80 % of DRAM bandwidth, 2 us per kernel; SDPA at 25 % of the fp16 peak); the qfx fp16
#: whole-model rows of tests/units/data/h100_e2e_fuse_qkv.json check them (-21 % .. +2 %).
#: "quantize": the separate token-wise quantize kernel, fitted to its profiled kernel time in the
#: session-4 build (tests/units/data/h100_e2e_gelu_quantize.json: bert-base 128x128 1.357 ms =
#: 12 x (K=768 + K=3072), bert-large 32x384 2.895 ms = 24 x (K=1024 + K=4096)): ~50 % of DRAM
#: bandwidth + 4 us, 120.8 us per layer vs 113.1 / 120.6 measured.
#: "sm80" (Ampere, sm_80/86: CUTLASS 2.x multistage integer GEMMs, cuBLAS fp16) and "sm_89" (Ada,
#: same kernels, its own tensor cores and caches): no H100 number is transferred. The GEMM
#: factors are fitted by :func:`qfx.tune.evidence.fit_family` on published ratios only
#: (qfx/tune/data/published_ampere.json): sm80 on TensorRT demoBERT's A100 rows and the paper's
#: A6000 Figure 1 ratios, sm_89 on demoBERT's L4 rows; the L40S rows and every FasterTransformer
#: row (A100, A10) and the A30 rows are held out. Memory, attention and quantize factors are the assumed ones.
#: Both fits end at alpha's bound 8 (compute and memory time overlap almost fully: the GEMM
#: takes the longer of the two) and sm80's fixed cost at its 10 us bound (at M <= 1024 the
#: published engines are latency-bound, which the fit can only express as fixed cost). ``evidence.check_published()`` gives each
#: row's error; tests/units/test_cost_model.py holds them to 25 % (the rows outside are named).
#: the assumed factors ("memory", "attention", "quantize"; see above), the same in every family
_ASSUMED = {"memory": KernelFit(1.0, 0.80, 1.0, 2.0), "attention": KernelFit(0.25, 0.80, 1.0, 4.0),
            "quantize": KernelFit(1.0, 0.50, 1.0, 4.0)}
FIT: dict[str, dict[str, KernelFit]] = {
    "sm90a": {"int": KernelFit(1.0, 1.0, 1.187, 4.899, 1.717), "fp16": KernelFit(0.808, 0.969, 1.666, 3.722, 0.0),
              **_ASSUMED},
    "sm80": {"int": KernelFit(0.725, 0.85, 8.0, 10.0, 1.142), "fp16": KernelFit(0.881, 0.85, 8.0, 10.0, 1.142), **_ASSUMED},
    "sm_89": {"int": KernelFit(1.0, 0.85, 8.0, 6.91, 0.316), "fp16": KernelFit(0.961, 0.85, 8.0, 6.91, 0.316), **_ASSUMED},
}

#: output tiles the model chooses from per family: the sm90 table's shapes
#: (backends/cutlass/configs.py), and the CUTLASS 2.x profiler's tensor-op tiles for sm80
TILES_BY_FAMILY: dict[str, tuple[tuple[int, int], ...]] = {
    "sm90a": TILES,
    "sm80": ((64, 64), (64, 128), (128, 64), (128, 128), (128, 256), (256, 128)),
}


def fit_key(target: Target) -> str:
    """The :data:`FIT` entry of ``target``: its own name where the architecture has its own
    factors (Ada, ``"sm_89"``), else its kernel family."""
    key = target.name if target.name in FIT else target.family
    if key not in FIT:
        raise ValueError(f"target {target.name}: the cost model has no factors for kernel family {target.family!r}")
    return key


def fit_for(target: Target, kind: str) -> KernelFit:
    """The :data:`FIT` factors of ``kind`` ("int", "fp16", "memory", "attention", "quantize") for ``target``."""
    return FIT[fit_key(target)][kind]


def codes_bytes(target: Target, bits: int) -> float:
    """Bytes per activation code in memory: packed nibbles only where the target's MMA takes
    s4 operands (:meth:`Target.mma_operand`), else one int8 byte per code."""
    return 0.5 if target.mma_operand(bits, bits) == "s4" else 1.0


#: qfx's backend today: the sm90a kernels fuse the dequant epilogue (fp16 out); the sm80
#: family writes int32 and runs the epilogue as a second kernel.
FUSED_EPILOGUE = {"sm90a": True, "sm80": False}


@dataclass(frozen=True)
class GemmEstimate:
    """Modelled time of one GEMM (with its epilogue when fused)."""

    us: float
    kernel: str  # "cutlass sm80 s4", "cutlass sm90a s8", "cuBLAS fp16"
    compute_us: float
    memory_us: float
    precision: str  # what the tensor cores run ("int4" on sm_90 runs as "int8")
    bytes_moved: float = 0.0  # the DRAM traffic counted in memory_us


def _kind(precision: str) -> str:
    return "fp16" if precision == "fp16" else "int"


def _check_gpu(target: Target) -> None:
    if not target.is_gpu:
        raise ValueError(f"target={target.name!r}: the cost model describes GPUs; pass a GPU target such as 'sm_86'")


def gemm_time(target: "Target | str", m: int, n: int, k: int, precision: str, *, out_bytes: float | None = None,
              fit: KernelFit | None = None, tiles: Iterable[tuple[int, int]] | None = None,
              fused_epilogue: bool | None = None, act_block: int | None = None,
              symmetric: bool = True) -> GemmEstimate:
    """Modelled time of ``[M, K] @ [N, K]^T`` in ``precision`` ("fp16", "int8", "int4") on ``target``.

    ``out_bytes``: bytes per output element; default fp16 (2) where the epilogue is fused or
    the GEMM is fp16, int32 (4) for unfused integer GEMMs. ``fused_epilogue``: None = what
    the backend builds today for the target's family (:data:`FUSED_EPILOGUE`).
    On a target without INT4 tensor cores "int4" runs (and is costed) as "int8". ``act_block``:
    block-scaled activations (:data:`SM_RATES`: the promotion per tile and K block, the scales read;
    ``symmetric=False`` adds the offset terms), the Triton block kernel.

    Example::

        >>> round(gemm_time("sm_90", 8192, 1024, 4096, "int8").us, 1)   # measured: 48.3 us
        54.0
    """
    target = get_target(target)
    _check_gpu(target)
    if precision not in BYTES_PER_ELEMENT:
        raise ValueError(f"precision={precision!r}: use one of {sorted(BYTES_PER_ELEMENT)}")
    if min(m, n, k) <= 0:
        raise ValueError(f"GEMM shape M={m}, N={n}, K={k}: every dimension must be positive")
    run = target.execution_precision(precision)
    fit = fit or fit_for(target, _kind(run))
    tiles = tiles or TILES_BY_FAMILY[target.family]
    peak = target.peak_for(run) * 1e6  # ops per microsecond
    per_sm = peak / target.sm_count
    # the per-tile overhead is counted in MMA steps of this GPU's own SM, its factor fitted per family
    step_us = _STEP_OPS / (target.peak_for("int8") * 1e6 / target.sm_count)
    if fused_epilogue is None:  # the Triton block kernel has its epilogue in every family
        fused_epilogue = act_block is not None or FUSED_EPILOGUE.get(target.family, True)
    if out_bytes is None:
        out_bytes = 2.0 if (run == "fp16" or fused_epilogue) else 4.0
    ab = BYTES_PER_ELEMENT[run]
    blocks = 0 if act_block is None or run == "fp16" else k / act_block
    scales = 4 * blocks * (m * (1 if symmetric else 2) + (0 if symmetric else n))  # fp32 scales, offsets, code sums
    moved = m * k * (1.0 if blocks else ab) + n * k * ab + m * n * out_bytes + scales  # block kernels read int8 codes
    memory = moved / (fit.eff_memory * target.bandwidth_gbs * 1e3)
    best: GemmEstimate | None = None
    bits = 4 if precision == "int4" else 8
    kernel = "cuBLAS fp16" if run == "fp16" else f"cutlass {target.family} {target.mma_operand(bits, bits)}"
    if blocks:
        kernel = block_kernel_name(target, bits, act_block)
    for tm, tn in tiles:
        tiles_n = math.ceil(m / tm) * math.ceil(n / tn)
        waves = math.ceil(tiles_n / target.sm_count)
        compute = waves * (2 * tm * tn * k / (fit.eff_compute * per_sm) + fit.tile_overhead_steps * step_us * tm * tn / (128 * 128)
                           + (promotion_us(target, tm * tn * blocks, symmetric) if blocks else 0.0))
        t = fit.fixed_us + (compute**fit.alpha + memory**fit.alpha) ** (1 / fit.alpha)
        if best is None or t < best.us:
            best = GemmEstimate(t, kernel, compute, memory, run, moved)
    return best


def elementwise_time(target: "Target | str", bytes_moved: float) -> float:
    """A memory-bound kernel moving ``bytes_moved`` bytes (LayerNorm, add, copy), microseconds."""
    target = get_target(target)
    _check_gpu(target)
    fit = fit_for(target, "memory")
    return fit.fixed_us + bytes_moved / (fit.eff_memory * target.bandwidth_gbs * 1e3)


def quantize_bytes(target: Target, m: int, k: int, bits: int, in_bytes: float = 2.0,
                   act_block: int | None = None) -> float:
    """DRAM bytes of a quantize: reads ``[M, K]`` (``in_bytes`` each; 0: folded into its producer), writes
    the codes (int8 bytes; packed nibbles on INT4 tensor cores) and a scale and offset per token, or per
    (token, block of ``act_block``)."""
    return m * k * (in_bytes + codes_bytes(target, bits)) + 8 * m * (1 if act_block is None else k / act_block)


def quantize_time(target: "Target | str", m: int, k: int, bits: int, in_bytes: float = 2.0,
                  act_block: int | None = None) -> float:
    """qfx's quantize kernel (token-wise, or block-scaled), microseconds: :func:`quantize_bytes`."""
    target = get_target(target)
    _check_gpu(target)
    fit = fit_for(target, "quantize")
    return fit.fixed_us + quantize_bytes(target, m, k, bits, in_bytes, act_block) / (fit.eff_memory * target.bandwidth_gbs * 1e3)


def epilogue_time(target: "Target | str", m: int, n: int) -> float:
    """The separate dequant epilogue (int32 in, fp16 out) of unfused integer GEMMs, microseconds."""
    return elementwise_time(target, m * n * (4 + 2) + 12 * n)


def attention_time(target: "Target | str", batch: int, seq: int, hidden: int, precision: str = "fp16") -> float:
    """SDPA with a padding mask (q, k, v, output and the mask read once), microseconds: fp16
    (qfx), or "int8" (TensorRT's fused MHA with INT8 I/O: int8 MMA, one byte per element)."""
    target = get_target(target)
    _check_gpu(target)
    fit = fit_for(target, "attention")
    flops = 4.0 * batch * seq * seq * hidden
    io = BYTES_PER_ELEMENT[precision]
    compute = flops / (fit.eff_compute * target.peak_for(precision) * 1e6)
    memory = (4 * batch * seq * hidden * io + batch * seq * seq * 2) / (fit.eff_memory * target.bandwidth_gbs * 1e3)
    return fit.fixed_us + (compute**fit.alpha + memory**fit.alpha) ** (1 / fit.alpha)


@dataclass(frozen=True)
class PartEstimate:
    """One layer part run in one precision: the GEMM plus the work the choice brings.

    ``quantize_us``: the activation quantize kernel this part needs (0 in fp16, or when the
    part shares its input's quantization with another part). ``epilogue_us``: a separate
    dequant kernel (unfused backends). ``extra_us``: work the choice brings downstream
    (fp16 FFN-in runs GELU as its own kernel; the integer GEMM fuses it).
    """

    part: str
    precision: str
    m: int
    n: int
    k: int
    gemm: GemmEstimate
    quantize_us: float
    epilogue_us: float
    extra_us: float = 0.0
    quantize_bytes: float = 0.0  # the DRAM traffic of the input quantize (in its producer when folded)

    @property
    def us(self) -> float:
        return self.gemm.us + self.quantize_us + self.epilogue_us + self.extra_us


def fused_quantize_time(target: "Target | str", m: int, k: int, bits: int, act_block: int | None = None) -> float:
    """The quantize folded into the kernel before it (LayerNorm, GELU epilogue), as the paper's
    pipeline does: only the codes and per-token (per-block) parameters are written, no launch."""
    target = get_target(target)
    _check_gpu(target)
    return quantize_bytes(target, m, k, bits, 0.0, act_block) / (fit_for(target, "memory").eff_memory * target.bandwidth_gbs * 1e3)


def part_time(target: "Target | str", part: str, m: int, n: int, k: int, precision: str, *, gelu: bool = False,
              quantize_input: bool = True, fused_quantize: bool = False,
              fused_epilogue: bool | None = None, out_bytes: float | None = None,
              act_block: int | None = None, symmetric: bool = True) -> PartEstimate:
    """Time of one layer part (``qkv``/``attn_out``/``ffn_in``/``ffn_out``) in ``precision``,
    counting the quantize of its input, an unfused epilogue and an unfused GELU honestly.

    ``fused_quantize``: cost the quantize as folded into the previous kernel (a fused
    LayerNorm, or the paper's pipeline), else a separate quantize kernel. ``fused_epilogue``:
    None = the backend of today (:data:`FUSED_EPILOGUE`), True = the dequant in the GEMM.
    ``out_bytes``: of the integer GEMM's output (1: int8 codes, as TensorRT's INT8 engines write).
    ``act_block``, ``symmetric``: block-scaled activations (:func:`gemm_time`, the quantize's block scales)."""
    target = get_target(target)
    if fused_epilogue is None:
        fused_epilogue = (act_block is not None and precision != "fp16") or FUSED_EPILOGUE.get(target.family, True)
    g = gemm_time(target, m, n, k, precision, fused_epilogue=fused_epilogue,
                  out_bytes=out_bytes if precision != "fp16" else None, act_block=act_block, symmetric=symmetric)
    bits = 4 if precision == "int4" else 8
    quant = moved = 0.0
    if precision != "fp16" and quantize_input:
        fq = fused_quantize_time if fused_quantize else quantize_time
        quant = fq(target, m, k, bits, act_block=act_block)
        moved = quantize_bytes(target, m, k, bits, 0.0 if fused_quantize else 2.0, act_block)
    epi = epilogue_time(target, m, n) if (precision != "fp16" and not fused_epilogue) else 0.0
    # cuBLAS fuses the bias but not GELU: a separate read+write of the [M, N] output
    extra = elementwise_time(target, 4.0 * m * n) if (gelu and precision == "fp16") else 0.0
    return PartEstimate(part, precision, m, n, k, g, quant, epi, extra, moved)


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of an encoder (HF config names in brackets).

    Attributes:
        name: label.
        hidden: hidden size h (``hidden_size``).
        layers: encoder layers (``num_hidden_layers``).
        ffn: intermediate size, 4h for BERT (``intermediate_size``).
        heads: attention heads (``num_attention_heads``).
        max_seq: longest sequence (``max_position_embeddings``).
    """

    name: str
    hidden: int
    layers: int
    ffn: int
    heads: int
    max_seq: int = 512

    def parts(self) -> list[tuple[str, int, int]]:
        """(part, N, K) of one layer's GEMMs, q/k/v fused into one (N = 3h) as fuse_qkv does."""
        h = self.hidden
        return [("qkv", 3 * h, h), ("attn_out", h, h), ("ffn_in", self.ffn, h), ("ffn_out", h, self.ffn)]

    @classmethod
    def from_config(cls, cfg: dict, name: str = "config") -> "ModelShape":
        """From a HF config dict (BERT / RoBERTa / DistilBERT spellings)."""
        def get(*keys):
            for key in keys:
                if key in cfg:
                    return cfg[key]
            raise ValueError(f"model config {name!r} has none of {keys}; it is not a BERT-family encoder config")

        hidden = int(get("hidden_size", "dim", "d_model"))
        return cls(name, hidden, int(get("num_hidden_layers", "n_layers", "encoder_layers")),
                   int(get("intermediate_size", "hidden_dim", "encoder_ffn_dim")),
                   int(get("num_attention_heads", "n_heads", "encoder_attention_heads")),
                   int(cfg.get("max_position_embeddings", 512)))


MODEL_SHAPES = {
    "bert-base": ModelShape("bert-base", 768, 12, 3072, 12),
    "bert-large": ModelShape("bert-large", 1024, 24, 4096, 16),
    "minilm": ModelShape("minilm", 384, 6, 1536, 12),
}


#: parts whose input quantize qfx folds into the residual add + LayerNorm before them on a GPU
#: (fuse_add_layer_norm_quantize; post-LN BERT: the attention block's LayerNorm feeds FFN-in,
#: the FFN block's feeds the next layer's q/k/v)
QUANTIZE_IN_NORM = ("qkv", "ffn_in")

#: :func:`model_latency` settings of the engines whose published timings check the model:
#: "qfx" (the backend of today), "paper" (quantize folded into LayerNorm/GELU, dequant in the
#: GEMM), "trt-int8" (TensorRT demoBERT's INT8 engine built with -iln -imh, and its fp16 engine),
#: "ft-int8-v2" (FasterTransformer int8_mode 2: int8-output GEMMs, quantized residual) and
#: "ft-int8-v1" (int8_mode 1: int32-output GEMMs dequantized by the next kernel, fp16 residual).
PIPELINES: dict[str, dict[str, bool]] = {
    "qfx": {},
    "paper": {"fused_quantize": True, "fused_epilogue": True},
    "trt-int8": {"int8_io": True, "fp16_fused": True},
    "ft-int8-v2": {"int8_io": True},
    "ft-int8-v1": {"fused_quantize": True, "fused_epilogue": False},
}


def model_latency(target: "Target | str", shape: ModelShape, batch: int, seq: int,
                  precisions: dict[str, str] | str, *, fused_quantize: bool = False,
                  fused_epilogue: bool | None = None, int8_io: bool = False, fp16_fused: bool = False,
                  quantize_in_norm: tuple[str, ...] = QUANTIZE_IN_NORM, act_block: int | None = None,
                  symmetric: bool = True) -> tuple[float, list[PartEstimate]]:
    """Predicted forward latency (microseconds, under a CUDA graph) of the whole encoder.

    ``precisions``: one precision for every part, or ``{part: precision}``. Integer parts
    quantize their input; q/k/v are one GEMM in integer precision (fuse_qkv) and three in
    fp16 (as qfx's fp16 graph runs them). The float parts (embeddings, attention, the
    attention-output copy, residual adds and LayerNorms) are counted once per layer. An
    integer part in ``quantize_in_norm`` (qfx's GPU pipeline: q/k/v and FFN-in) has its
    quantize and its LayerNorm folded into the residual add: one kernel writing y and the codes.
    ``fused_quantize``: every quantize folded into its producer (the paper's pipeline).
    ``int8_io`` (all parts integer; TensorRT's INT8 engine, FasterTransformer int8_mode 2):
    the GEMMs write int8 codes, attention and the residual LayerNorms read and write int8, so
    no quantize kernel runs and activations move one byte per element. ``fp16_fused``: the fp16
    parts as TensorRT builds them (q/k/v one GEMM, GELU in the FFN-in GEMM's epilogue).
    :data:`PIPELINES` names these settings per published engine. ``act_block`` (``symmetric``): block-scaled
    integer parts (:data:`SM_RATES`); an integer FFN-in whose FFN-out is integer writes the FFN-out's codes
    and block scales from its epilogue (the FFN intermediate never in fp16, no quantize kernel).
    Returns the total and one :class:`PartEstimate` per part of one layer.
    """
    target = get_target(target)
    if isinstance(precisions, str):
        precisions = {p: precisions for p, _, _ in shape.parts()}
    m, h = batch * seq, shape.hidden
    if int8_io and any(precisions.get(p, "fp16") == "fp16" for p, _, _ in shape.parts()):
        raise ValueError("int8_io=True describes an engine whose every GEMM is integer; got fp16 parts in precisions")
    io = 1 if int8_io else 2  # bytes per activation element between kernels
    parts, norm_sites = [], 0.0
    ints = {p for p, _, _ in shape.parts() if precisions.get(p, "fp16") != "fp16"}
    producer = act_block is not None and not int8_io and {"ffn_in", "ffn_out"} <= ints
    blocks = dict(act_block=None if int8_io else act_block, symmetric=symmetric)
    for part, n, k in shape.parts():
        prec = precisions.get(part, "fp16")
        in_norm = part in quantize_in_norm and prec != "fp16"
        if part in quantize_in_norm:  # the residual add + LayerNorm feeding it: one kernel or two
            norm_sites += elementwise_time(target, 3 * m * h * io) + (0.0 if in_norm else elementwise_time(target, 2 * m * h * 2))
        if part == "qkv" and prec == "fp16" and not fp16_fused:
            one = part_time(target, part, m, n // 3, k, prec)
            parts.append(PartEstimate(part, prec, m, n, k, GemmEstimate(3 * one.gemm.us, one.gemm.kernel + " x3",
                                                                         3 * one.gemm.compute_us, 3 * one.gemm.memory_us, "fp16"), 0.0, 0.0))
        else:
            out = 1.0 if int8_io else None
            if producer and part == "ffn_in":  # codes + a scale and an offset per (row, block)
                out = codes_bytes(target, 4 if precisions["ffn_out"] == "int4" else 8) + 8 / act_block
            parts.append(part_time(target, part, m, n, k, prec, gelu=(part == "ffn_in" and not fp16_fused),
                                   quantize_input=not int8_io and not (producer and part == "ffn_out"),
                                   fused_quantize=fused_quantize or in_norm,
                                   fused_epilogue=True if int8_io else fused_epilogue, out_bytes=out, **blocks))
    per_layer_float = (
        attention_time(target, batch, seq, h, "int8" if int8_io else "fp16")
        + elementwise_time(target, 2 * m * h * io)  # attention output transpose/contiguous copy
        + norm_sites  # residual adds and LayerNorms
    )
    embeddings = 3 * elementwise_time(target, m * h * 2) + elementwise_time(target, 2 * m * h * 2)
    total = embeddings + shape.layers * (per_layer_float + sum(p.us for p in parts))
    return total, parts
