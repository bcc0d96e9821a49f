"""CUTLASS integer GEMMs for qfx: int8/int4 tensor-core GEMMs with the dequant fused.

* sm_90 (Hopper): CUTLASS 3.x warp-specialized wgmma int8 GEMMs. int4 codes run on them
  sign-extended to int8 (bit-identical accumulators). fp16 output: fused epilogue; bf16/fp32
  output: int32 GEMM + one epilogue kernel.
* sm_80/86/89: CUTLASS 2.x INT4 (mma m16n8k64) and INT8 (m16n8k32) GEMMs, int32 output, then the
  epilogue kernel; block-scaled activations (``act_block``): :mod:`.block_linear`, native INT4 mma
  with the per-block fp32 promotion in registers (on sm_90 the Triton block kernel runs those).

The package is three layers:

* :mod:`.capability`: what can run here and why not (pure Python; the planner asks it);
* :mod:`.launch`: the lean launch layer (one ctypes call per kernel; launchers bound at compile
  time for the runtime);
* :mod:`.ops`: the checked general API below, registered as the ``"cutlass"`` implementation of
  ``qfx::int_linear`` & co.

The native library (C ABI, no libtorch) is built by ``pip install -e .`` from the config table
in ``configs.py``; it is opened on first use, never at import.

Example::

    >>> from qfx.backends import cutlass as qc
    >>> ok, why = qc.available()
    >>> acc = qc.int_matmul(a, b)   # a [M,K], b [N,K] int8 CUDA tensors -> int32 [M,N]
"""
from __future__ import annotations

from qfx.ops import register_impl

from . import block_linear
from ._validate import BadInput
from .capability import available, can_implement, family_for
from .ops import add_layer_norm_quantize, add_layer_norm_rotate_quantize, int_linear, int_matmul, quantize, unpack_int4

__all__ = ["available", "can_implement", "can_implement_blocks", "block_linear", "int_matmul", "int_linear", "quantize", "unpack_int4",
           "add_layer_norm_quantize", "add_layer_norm_rotate_quantize",
           "family_for", "BadInput", "register"]

can_implement_blocks = block_linear.can_implement


def register() -> None:
    """Plug the checked ops into ``qfx.ops`` as backend "cutlass" (no library load here: a
    missing library or kernel is reported when an op first runs, and by ``available()``)."""
    register_impl("int_matmul", "cutlass", lambda a, b: int_matmul(a, b))
    register_impl("int_linear", "cutlass", int_linear)
    register_impl("int_linear", "cutlass", block_linear.int_linear_blocks_op, blocks=True)  # act_block set: sm_8x
    register_impl("quantize", "cutlass", quantize)
    register_impl("add_layer_norm_quantize", "cutlass", add_layer_norm_quantize)
    register_impl("add_layer_norm_rotate_quantize", "cutlass", add_layer_norm_rotate_quantize)


register()
