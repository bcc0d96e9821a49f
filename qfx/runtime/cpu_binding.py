"""Launchers of the CPU backend: its ops bound at compile time, called without the dispatcher.

Through ``torch.ops.qfx.*`` every call pays the dispatcher and the custom-op wrapper (tens of
microseconds, x 48 ops in a six-layer encoder: visible at batch 1). A launcher is the kernel
function with every argument but the activations fixed once: weights, scales, bias, bits,
clip, GELU. The runtime's lean graph (qfx.runtime.launch_plan) calls it with the activation
arguments it lists per op (``_CALL_ARGS`` there): ``x``; ``a, a_scale, a_offset``;
``a, b, weight, bias``. Same functions as the ops, so the same bits.

Example::

    >>> fn = bind(gm, node)          # node: a qfx::int_linear call planned on "cpu"
    >>> y = fn(codes, scale, offset)
"""
from __future__ import annotations

from typing import Callable

from torch.fx import GraphModule, Node

from qfx.backends.cpu import kernels
from qfx.schema import ADD_LAYER_NORM_QUANTIZE, ADD_LAYER_NORM_ROTATE_QUANTIZE, INT_LINEAR, QUANTIZE, arg, is_call, op_buffer

__all__ = ["bind", "Launcher"]


class Launcher:
    """One op's kernel function with every argument but the activations fixed."""

    def __init__(self, fn: Callable, **fixed) -> None:
        self.fn, self.fixed = fn, fixed

    def __call__(self, *activations):
        return self.fn(*activations, **self.fixed)


def _clip(node: Node) -> dict:
    return dict(clip_lo=arg(node, "clip_lo"), clip_hi=arg(node, "clip_hi"))


def _quant(node: Node) -> dict:
    return dict(bits=arg(node, "bits"), symmetric=arg(node, "symmetric"), **_clip(node))


def bind(gm: GraphModule, node: Node) -> Callable | None:
    """The launcher of ``node`` (an op planned on the CPU backend) as a bound method (what
    torch.fx can name in generated code), or None for other ops."""
    blocks = arg(node, "act_block") if is_call(node, (INT_LINEAR, QUANTIZE, ADD_LAYER_NORM_QUANTIZE)) else None
    if blocks is not None:  # block-scaled: the same kernels' block forms, the block fixed too
        return _bind_blocks(gm, node, blocks)
    if is_call(node, INT_LINEAR):
        launcher = Launcher(kernels.int_linear, w=op_buffer(gm, node, "w"), w_bits=arg(node, "w_bits"),
                            w_scale=op_buffer(gm, node, "w_scale"), w_offset_sum=op_buffer(gm, node, "w_offset_sum"),
                            bias=op_buffer(gm, node, "bias"), gelu=arg(node, "gelu"), out_dtype=arg(node, "out_dtype"),
                            a_bits=arg(node, "a_bits"))
    elif is_call(node, QUANTIZE):
        launcher = Launcher(kernels.quantize, gelu=bool(arg(node, "gelu")), **_quant(node))
    elif is_call(node, ADD_LAYER_NORM_QUANTIZE):
        launcher = Launcher(kernels.add_layer_norm_quantize, eps=arg(node, "eps"), **_quant(node))
    elif is_call(node, ADD_LAYER_NORM_ROTATE_QUANTIZE):
        launcher = Launcher(kernels.add_layer_norm_rotate_quantize, eps=arg(node, "eps"), signs=op_buffer(gm, node, "signs"),
                            block=arg(node, "block"), **_quant(node))
    else:
        return None
    return launcher.__call__


def _bind_blocks(gm: GraphModule, node: Node, act_block: int) -> Callable:
    if is_call(node, INT_LINEAR):  # w_offset_sum holds the weight's block sums [N, K / B]
        launcher = Launcher(kernels.int_linear_blocks, w=op_buffer(gm, node, "w"), w_bits=arg(node, "w_bits"),
                            w_scale=op_buffer(gm, node, "w_scale"), w_block_sums=op_buffer(gm, node, "w_offset_sum"),
                            bias=op_buffer(gm, node, "bias"), gelu=arg(node, "gelu"), out_dtype=arg(node, "out_dtype"),
                            a_bits=arg(node, "a_bits"), act_block=act_block)
    elif is_call(node, QUANTIZE):
        launcher = Launcher(kernels.quantize_blocks, gelu=bool(arg(node, "gelu")), act_block=act_block, **_quant(node))
    else:
        launcher = Launcher(kernels.add_layer_norm_quantize_blocks, eps=arg(node, "eps"), act_block=act_block,
                            **_quant(node))
    return launcher.__call__
