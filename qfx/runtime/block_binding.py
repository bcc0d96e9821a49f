"""Launch-plan binding of the block-scaled Triton kernels (backend ``'triton'``): which graph nodes
the launchers of :mod:`qfx.backends.triton.block_gemm` take, and the FFN-in producer pattern
(GEMM + GELU + block quantize bound as one kernel). Graph matching lives here, on the runtime
floor, beside the CUTLASS binder of :mod:`qfx.runtime.launch_plan`; the kernels stay in backends/."""
from __future__ import annotations

import operator

from qfx.backends.triton.block_gemm import (NAME, BlockLinearLauncher, BlockLinearQuantizeLauncher, _int8_weight,
                                            quantize_blocks)
from qfx.backends.triton.norm_block_quant import AddLayerNormBlockQuantizeLauncher
from qfx.schema import (ADD_LAYER_NORM_QUANTIZE, INT_LINEAR, META_LINEAR, QUANTIZE, arg, is_call, op_buffer,
                        set_args)

__all__ = ["binder", "bind_producers", "rebind_block_ops", "cutlass_block_linear"]


def _clip(node):
    lo = arg(node, "clip_lo")
    return None if lo is None else (lo, arg(node, "clip_hi"))


def _symmetric_codes(node) -> bool:
    """Whether the block linear ``node`` reads codes whose offsets are zeros (its ``a`` is
    getitem(quantize, 0) of a symmetric quantizer), so its kernel may skip the offset term."""
    a = arg(node, "a")
    producer = a.args[0] if getattr(a, "target", None) is operator.getitem else None
    return bool(arg(producer, "symmetric")) if is_call(producer, (QUANTIZE, ADD_LAYER_NORM_QUANTIZE)) else False


def _linear_launcher(gm, node) -> BlockLinearLauncher:
    return BlockLinearLauncher(op_buffer(gm, node, "w"), arg(node, "w_bits"), op_buffer(gm, node, "w_scale"),
                               op_buffer(gm, node, "w_offset_sum"), op_buffer(gm, node, "bias"), arg(node, "gelu"),
                               arg(node, "out_dtype"), arg(node, "act_block"), _symmetric_codes(node))


def cutlass_block_linear(gm, node):
    """The launcher of a block-scaled ``qfx::int_linear`` on backend 'cutlass' (the sm_80-family
    native-INT4 kernel, qfx.backends.cutlass.block_linear), bound once to its weights."""
    from qfx.backends.cutlass.block_linear import BlockLinearLauncher as Sm80BlockLinearLauncher

    return Sm80BlockLinearLauncher(op_buffer(gm, node, "w"), arg(node, "w_bits"), op_buffer(gm, node, "w_scale"),
                                   op_buffer(gm, node, "w_offset_sum"), op_buffer(gm, node, "bias"), arg(node, "gelu"),
                                   arg(node, "out_dtype"), arg(node, "a_bits"), arg(node, "act_block"),
                                   _symmetric_codes(node)).__call__


def binder(gm, node):
    """Launch-plan binder of backend 'triton' (qfx.runtime.launch_plan.BINDERS): a launcher taking the
    op's activation arguments, or None for what these kernels do not run."""
    if arg(node, "act_block") is None:
        return None
    if is_call(node, INT_LINEAR):
        return _linear_launcher(gm, node).__call__
    if is_call(node, ADD_LAYER_NORM_QUANTIZE):  # the fused LayerNorm producer (backends/triton/norm_block_quant.py)
        return AddLayerNormBlockQuantizeLauncher(arg(node, "eps"), arg(node, "bits"), arg(node, "symmetric"),
                                                 _clip(node), arg(node, "act_block")).__call__
    if is_call(node, QUANTIZE):
        bits, symmetric, clip, gelu, block = (arg(node, "bits"), arg(node, "symmetric"), _clip(node), arg(node, "gelu"),
                                              arg(node, "act_block"))
        lo, hi = (None, None) if clip is None else clip
        return lambda x: quantize_blocks(x, bits, symmetric, lo, hi, gelu, block)
    return None


def bind_producers(gm, graph) -> list[str]:
    """Pattern (in ``graph``, a copy of ``gm``'s for the launch plan): ``y = qfx::int_linear(..., 'triton',
    act_block=B, gelu=False)`` read only by ``qfx::quantize(y, ..., 'triton', gelu=g, act_block=B')``
    (B' a power of two dividing N) -> the quantize calls :class:`BlockLinearQuantizeLauncher` on the
    linear's activation arguments, one kernel, and the linear is left dead: the fp16 FFN intermediate
    is never written. The codes are exactly the two ops' (tested). Returns the bound linears' names."""
    bound = []
    for node in list(graph.nodes):
        if not (is_call(node, QUANTIZE) and arg(node, "backend") == NAME and arg(node, "act_block") is not None):
            continue
        lin = arg(node, "x")
        if not (is_call(lin, INT_LINEAR) and arg(lin, "backend") == NAME and arg(lin, "act_block") is not None
                and len(lin.users) == 1 and not arg(lin, "gelu")):
            continue
        q_block = arg(node, "act_block")
        n = op_buffer(gm, lin, "w_offset_sum").shape[0]
        if n % q_block or q_block & (q_block - 1) or q_block < 16:
            continue
        launcher = BlockLinearQuantizeLauncher(_linear_launcher(gm, lin), arg(node, "bits"), arg(node, "symmetric"),
                                               _clip(node), arg(node, "gelu"), q_block)
        node.target, node.args, node.kwargs = launcher.__call__, (arg(lin, "a"), arg(lin, "a_scale"), arg(lin, "a_offset")), {}
        bound.append(lin.meta[META_LINEAR].name if META_LINEAR in lin.meta else lin.name)
        graph.erase_node(lin)  # its only reader now reads its inputs
    return bound


def rebind_block_ops(gm) -> int:
    """Bind every block-scaled ``qfx::int_linear`` / ``qfx::quantize`` of a planned graph to these
    kernels (``backend='triton'``) and unpack its int4 weights now (not inside a CUDA-graph
    capture); returns how many ops it bound. The interim planner step until ``qfx.passes.plan``
    asks ``LinearWork.act_block`` (then :class:`TritonBlockBackend` is chosen there)."""
    bound = 0
    for node in gm.graph.nodes:
        if is_call(node, (INT_LINEAR, QUANTIZE)) and arg(node, "act_block") is not None:
            set_args(node, backend=NAME)
            if is_call(node, INT_LINEAR):
                _int8_weight(op_buffer(gm, node, "w"), arg(node, "w_bits"))
            bound += 1
    gm.recompile()
    return bound
