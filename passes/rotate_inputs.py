r"""rotate_inputs: quantized linears read their input rotated, their weights rotated to match (L2 -> L2).

Pattern: every annotated ``aten.linear(x, W, b)`` whose ``QuantSpec.rotation`` is a block size
``b`` (``QuantConfig(rotation=b)``). Rewrite, with ``R = diag(s) blockdiag(H_b) / sqrt(b)`` of
:mod:`qfx.numerics` (``K`` = the linear's input width)::

    linear(x, W, b)  ->  xr = qfx::rotate(x, qfx_rotation_k{K}_signs, b)   one per (x, K, b)
                         linear(xr, W R, b)

so q, k and v, which read one tensor, still read one (rotated) tensor: later passes quantize it
once and fuse the three GEMMs as before. ``W <- W R`` is computed in fp64 from the weight the
integer codes will be made of (the fp32 master weight when the graph holds a lower-precision
copy) and written back in place; a weight several linears share is rotated once.

Why online and not folded (QuaRot folds ``R`` into the previous layer): in a post-LN encoder the
rotated tensors are LayerNorm outputs (also the residual stream) and GELU outputs; neither
commutes with a rotation, so ``x R`` is computed where it is read: ``qfx::rotate``, a fast
Walsh-Hadamard transform in fp32 (:func:`qfx.numerics.rotate_blocks`; one Triton kernel on a
GPU), ``log2(b)`` additions per element in one pass over the tensor, against ``N`` multiply-adds
for the linear itself. Not a GEMM by ``R``: a GEMM's summation order depends on the row count,
so a token would round differently in the QAT graph's batch and in the compiled model's padded
bucket; the transform gives the same bits at any row count, which keeps the two bit-identical.

``already_rotated`` (weight name -> block) is for compiling a QAT model: its trained weights
already are ``W R`` (this pass rotated them at ``prepare_qat``), so only the inputs are rotated,
and that for every linear that was rotated in training, also one the compile keeps in float
(``skip=``): a float ``linear(x R, W R)`` is still the trained function.

Invariant: in exact arithmetic every linear's output is unchanged (tested against the float
model to fp32 rounding); ``node.meta["qfx"]`` and each linear's users are untouched;
``gm.meta["qfx_rotated"]`` lists the weights whose linears read a rotated input, by block.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

import qfx.numerics as numerics
from qfx.passes._attrs import param_or_buffer
from qfx.schema import META_LINEAR, META_ROTATED, ROTATE, LinearInfo, linear_nodes

__all__ = ["rotate_inputs"]

aten = torch.ops.aten


def _rotation_node(gm: GraphModule, x: Node, k: int, block: int, like: torch.Tensor) -> Node:
    """``qfx::rotate(x, signs, block)`` inserted right after ``x``; the fp32 sign buffer is shared
    by every rotation of the same width (on the weights' device)."""
    name = f"qfx_rotation_k{k}_signs"
    if not hasattr(gm, name):
        gm.register_buffer(name, numerics.rotation_signs(k).to(like.device))
    with gm.graph.inserting_after(x):
        signs = gm.graph.get_attr(name)
    with gm.graph.inserting_after(signs):
        node = gm.graph.call_function(ROTATE, (x, signs, block))
    val = x.meta.get("val")
    if isinstance(val, torch.Tensor):
        node.meta["val"] = val
    return node


def rotate_inputs(
    gm: GraphModule,
    master_weights: dict[str, torch.Tensor] | None = None,
    already_rotated: dict[str, int] | None = None,
) -> GraphModule:
    """Rotate the inputs (and, unless ``already_rotated``, the weights) of every linear whose spec
    asks for it; ``master_weights`` (name -> fp32, the compile's copy) are rotated alongside."""
    rotated: dict[str, int] = {}
    inputs: dict[tuple[Node, int, int], Node] = {}
    for node in linear_nodes(gm):
        info: LinearInfo | None = node.meta.get(META_LINEAR)
        if info is None:
            continue
        if already_rotated is not None:
            block = already_rotated.get(info.weight)
        else:
            block = info.spec.rotation if info.spec is not None else None
        if block is None:
            continue
        if node.target is not aten.linear.default:
            raise ValueError(f"rotate_inputs runs on the annotated float graph (L2); linear {info.name} is already {node.target}")
        x, k = node.args[0], info.in_features
        weight = param_or_buffer(gm, info.weight)
        key = (x, k, block)
        if key not in inputs:
            inputs[key] = _rotation_node(gm, x, k, block, weight)
        node.args = (inputs[key], *node.args[1:])
        if already_rotated is None and info.weight not in rotated:
            r = numerics.rotation_matrix(k, block)
            with torch.no_grad():
                weight.copy_((weight.detach().double() @ r.to(weight.device)).to(weight.dtype))
            if master_weights is not None and info.weight in master_weights:
                m = master_weights[info.weight]
                master_weights[info.weight] = (m.double() @ r.to(m.device)).to(m.dtype)
        rotated[info.weight] = block
    gm.meta[META_ROTATED] = dict(already_rotated or rotated)
    gm.graph.lint()
    gm.recompile()
    return gm
