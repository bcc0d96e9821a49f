"""Where do the block-scaled Triton kernels differ from torch on this GPU? (issue 23, open question)

On an H100 (2026-12-06) 16 GPU tests of tests/kernels/test_block_gemm.py failed while the same kernels
pass under the Triton interpreter on the CPU: every shape of ``test_block_linear_equals_the_reference_on_the_gpu``
(whose epilogue table has an fp32 GELU case), the FFN-in producer's codes at M = 4096, and the block quantize
with fp32 input, not with fp16 / bf16 (the failing runs' tracebacks were not kept: run
``python -m pytest -m gpu tests/kernels/test_block_gemm.py --tb=long`` beside this probe). The pattern first
pointed at the last bit of erf in the GELU, but ``tl.math.erf`` compiled for sm_90 (Triton 3.9) is, instruction
for instruction and constant for constant, the erff nvcc 13 emits, except that Triton flushes denormals
(``fma.rn.ftz``), which no test input reaches. This probe tells, in one short GPU run:

1. erf and GELU mismatches of ``tl.math.erf`` against ``torch.erf`` / ``torch.nn.functional.gelu``, with
   and without fp fusion (the block kernels launch without it);
2. the same for an erf written in Triton as CUDA 13's libdevice ``__nv_erff`` computes it without flushing
   (its two polynomials with explicit fmas, ex2 on the large branch);
3. the fp32 block quantize, case by case (codes, scale, offset: where and by how much).

    python benchmarks/block_exactness_probe.py
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qfx import numerics as nx
from qfx.backends.triton import block_gemm as bg
from qfx.backends.triton.block_gemm_kernels import _SQRT1_2


@triton.jit
def _erf_libdevice_form(a):
    """CUDA 13 libdevice's __nv_erff, operation for operation (non-ftz branch)."""
    ax = tl.abs(a)
    big = ax >= 1.002959966659546
    t = tl.where(big, ax, a * a)
    p = tl.where(big, 0.00011219871521461755, 8.483494457323104e-05)
    p = tl.fma(p, t, tl.where(big, -0.0013275252422317863, -0.0008213091641664505))
    p = tl.fma(p, t, tl.where(big, 0.00839653518050909, 0.005213488824665546))
    p = tl.fma(p, t, tl.where(big, -0.04024658352136612, -0.026868773624300957))
    p = tl.fma(p, t, tl.where(big, 0.15950430929660797, 0.11284004896879196))
    p = tl.fma(p, t, tl.where(big, 0.9129176735877991, -0.37612664699554443))
    p = tl.fma(p, t, tl.where(big, 0.6290600299835205, 0.12837915122509003))
    u = tl.where(big, -t, a)
    r = tl.fma(p, u, u)
    one_minus = 1.0 - tl.math.exp2(r)
    return tl.where(big, tl.where(a < 0, -one_minus, one_minus), r)


@triton.jit
def _erf_gelu_kernel(x_ptr, erf_ptr, gelu_ptr, n, LIBDEVICE_FORM: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + r, mask=r < n)
    if LIBDEVICE_FORM:
        e, g = _erf_libdevice_form(v), _erf_libdevice_form(v * _SQRT1_2)
    else:
        e, g = tl.math.erf(v), tl.math.erf(v * _SQRT1_2)
    tl.store(erf_ptr + r, e, mask=r < n)
    tl.store(gelu_ptr + r, v * 0.5 * (1.0 + g), mask=r < n)


def erf_mismatches() -> None:
    for spread in (0.05, 3.0, 30.0):
        x = torch.randn(1 << 22, device="cuda") * spread
        for form in (False, True):
            for fusion in (False, True):
                erf, gelu = torch.empty_like(x), torch.empty_like(x)
                _erf_gelu_kernel[(x.numel() // 1024,)](x, erf, gelu, x.numel(), LIBDEVICE_FORM=form, BLOCK=1024,
                                                       enable_fp_fusion=fusion)
                print(f"x ~ N(0, {spread}), {'libdevice form' if form else 'tl.math.erf  '}, fp fusion {fusion!s:5}: "
                      f"erf differs at {(erf != torch.erf(x)).sum().item()}, GELU at "
                      f"{(gelu != torch.nn.functional.gelu(x)).sum().item()} of {x.numel()}")


def fp32_quantize_cases() -> None:
    bg.register()
    x = torch.randn(1000, 768, device="cuda") * 3
    for bits, symmetric, gelu, clip in [(4, True, True, None), (8, False, True, (-1.0, 2.0)), (4, False, False, None),
                                        (8, True, False, (-1.0, 2.0))]:
        want = nx.quantize_activation(x, bits, symmetric, clip, gelu, block=128)
        got = bg.quantize_blocks(x, bits, symmetric, *(clip or (None, None)), gelu, 128)
        for what, a, b in zip(("codes", "scale", "offset"), got, want):
            bad = a != b
            first = bad.nonzero()[0].tolist() if bad.any() else None
            where = f", first at {first}: {a[tuple(first)].item()!r} vs {b[tuple(first)].item()!r}" if first else ""
            print(f"fp32 quantize bits={bits} symmetric={symmetric} gelu={gelu} clip={clip}: {what} differs at "
                  f"{bad.sum().item()} of {bad.numel()}{where}")


def written_forms() -> None:
    """The kernels' own erf forms (block_gemm_kernels._erf) against torch.erf, and the one erf_form picks."""
    from qfx.backends.triton import block_gemm_kernels as bk
    x = torch.randn(1 << 22, device="cuda") * 3
    for form in (0, 1, 2):
        got = torch.empty_like(x)
        bk.erf_probe_kernel[(x.numel() // 1024,)](x, got, x.numel(), ERF=form, BLOCK=1024, enable_fp_fusion=False)
        print(f"kernel erf form {form}: differs from torch.erf at {(got != torch.erf(x)).sum().item()} of {x.numel()}")
    print("block_gemm.erf_form picks", bg.erf_form(x.device))


if __name__ == "__main__":
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "Triton", triton.__version__,
          torch.cuda.get_device_name())
    erf_mismatches()
    written_forms()
    fp32_quantize_cases()
