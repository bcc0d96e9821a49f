"""fuse_add_layer_norm_quantize: residual add + LayerNorm + token-wise quantize in one kernel
(L5, GPU, fp16 / bf16 float parts).

Pattern (the two LayerNorms of every BERT layer and the embeddings' one)::

    s = aten.add(a, b)                         (optional; s read by the LayerNorm alone,
                                                a and b of s's shape)
    y = aten.layer_norm(s, [K], weight, bias, eps)
    q, scale, offset = qfx::quantize(y, bits, symmetric, clip_lo, clip_hi, backend)
    ->
    y, q, scale, offset = qfx::add_layer_norm_quantize(a, b, weight, bias, eps, bits,
                                                       symmetric, clip_lo, clip_hi, backend)

One pass over the row instead of three kernels (7 bytes moved per element instead of 13).

Rotated readers (``QuantConfig(rotation=b)``, :mod:`qfx.passes.rotate_inputs`)::

    s = aten.add(a, b)?;  y = aten.layer_norm(s, ...)
    r = qfx::rotate(y, signs, b)               (r read by the quantize alone)
    q, scale, offset = qfx::quantize(r, ...)
    ->
    y, q, scale, offset = qfx::add_layer_norm_rotate_quantize(a, b, weight, bias, eps, signs, b,
                                                              bits, symmetric, clip_lo, clip_hi, backend)

one kernel where four ran (:mod:`qfx.backends.triton.rotation_quant`); its codes are exactly
``quantize(rotate(y))`` of the ``y`` it returns.

Block-scaled readers (``QuantConfig(act_block=B)``: the quantize carries ``act_block``, planned on
the block backend, ``'triton'``)::

    s = aten.add(a, b)?;  y = aten.layer_norm(s, ...)
    q, scale, offset = qfx::quantize(y, ..., 'triton', act_block=B)      (scale, offset [..., K / B])
    ->
    y, q, scale, offset = qfx::add_layer_norm_quantize(a, b, weight, bias, eps, bits, symmetric,
                                                       clip_lo, clip_hi, 'triton', act_block=B)

one kernel where three ran (:mod:`qfx.backends.triton.norm_block_quant`: the block scales of the
consumer GEMM come out of the LayerNorm). Where that kernel cannot run (no Triton, a row or block
it cannot hold, a quantize on another backend, a rotated reader: no fused kernel rotates and
block-quantizes) the chain is left as it is and the reason recorded.

Invariant: the codes are exactly ``quantize(y)`` of the ``y`` the graph carries on (the
residual stream reads the same ``y``), so the integer linears see codes consistent with the
float path. ``y`` equals torch's LayerNorm up to fp32 rounding of the mean and variance
(another summation order), which is why the pass runs only where the float parts are fp16 /
bf16 (the compiled model then is the twin up to float-part rounding already); with
``float_dtype=torch.float32`` the graph keeps torch's LayerNorm and stays bit-identical to its
QAT twin (block-scaled or not). A LayerNorm whose row the kernel cannot hold (K > 1024 or not a
multiple of 8; block-scaled: K > 4096) is left as it is, and ``gm.meta["qfx_fused_norms"]`` says
how many were fused (rotated and block-scaled readers included; ``gm.meta["qfx_fused_rotated_norms"]``
counts the rotated ones) and why others not.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from qfx.ops import registered_backends
from qfx.schema import META_FUSED_NORMS, META_FUSED_ROTATED_NORMS, QUANTIZE, ROTATE, arg, is_call

__all__ = ["fuse_add_layer_norm_quantize"]

aten = torch.ops.aten
_FUSED = torch.ops.qfx.add_layer_norm_quantize.default
_FUSED_ROTATED = torch.ops.qfx.add_layer_norm_rotate_quantize.default


def _val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = _val(a), _val(b)
    return va is not None and vb is not None and str(tuple(va.shape)) == str(tuple(vb.shape))


def _block_refusal(q: Node, rot: Node | None, block_backend: str) -> str | None:
    """Why a block-scaled quantize's chain cannot take the block kernel, None when it can (so far)."""
    block, on = arg(q, "act_block"), arg(q, "backend")
    if on != block_backend:
        return (f"act_block={block}: the quantize runs on backend {on!r}; the fused LayerNorm kernel that emits "
                f"block scales is backend {block_backend!r}'s")
    if block_backend not in registered_backends("add_layer_norm_quantize", blocks=True):
        return f"act_block={block}: backend {block_backend!r} registers no block-scaled add_layer_norm_quantize"
    if rot is not None:
        return f"act_block={block} with rotation: no fused kernel rotates and block-quantizes (they run apart)"
    return None


def fuse_add_layer_norm_quantize(gm: GraphModule, float_dtype: torch.dtype, backend: str = "cutlass",
                                 fits=None, fits_rotated=None, block_backend: str = "triton",
                                 fits_block=None) -> GraphModule:
    """Fuse every add -> layer_norm -> [rotate ->] quantize(backend) chain, and every add -> layer_norm
    -> quantize(block_backend, act_block=B) chain; see the module doc.

    ``fits(k, dtype) -> (ok, why)`` says whether the backend's kernel takes a row (default: the
    CUTLASS library's answer), ``fits_rotated(k, dtype, block)`` the same for the rotated form
    (default: :func:`qfx.backends.triton.rotation_quant.fits`), ``fits_block(k, dtype, act_block)``
    for the block-scaled form on ``block_backend`` (default:
    :func:`qfx.backends.triton.norm_block_quant.fits`); tests pass other backends and predicates.
    """
    from qfx.backends.cutlass.launch import ADD_LN_DTYPES  # the kernel's own dtype rule

    if float_dtype not in ADD_LN_DTYPES:
        gm.meta[META_FUSED_NORMS] = (0, f"float parts in {float_dtype}: torch's LayerNorm kept")
        return gm
    if fits is None:
        from qfx.backends.cutlass.launch import add_layer_norm_fits as fits
    if fits_rotated is None:
        from qfx.backends.triton.rotation_quant import fits as fits_rotated
    if fits_block is None:
        from qfx.backends.triton.norm_block_quant import fits as fits_block
    graph = gm.graph
    fused, fused_rotated, refused = 0, 0, set()
    for q in [n for n in graph.nodes if is_call(n, QUANTIZE) and not arg(n, "gelu")
              and (arg(n, "backend") == backend or arg(n, "act_block") is not None)]:
        ln, rot, block = arg(q, "x"), None, arg(q, "act_block")
        if is_call(ln, ROTATE) and len(ln.users) == 1:
            rot, ln = ln, ln.args[0]
        if not is_call(ln, aten.layer_norm.default):
            continue
        if block is not None and (why := _block_refusal(q, rot, block_backend)) is not None:
            refused.add(why)
            continue
        x, shape = ln.args[0], ln.args[1]
        weight = ln.args[2] if len(ln.args) > 2 else ln.kwargs.get("weight")
        bias = ln.args[3] if len(ln.args) > 3 else ln.kwargs.get("bias")
        eps = ln.args[4] if len(ln.args) > 4 else ln.kwargs.get("eps", 1e-5)
        y_val = _val(ln)
        if weight is None or bias is None or y_val is None or len(shape) != 1:
            continue
        k = int(y_val.shape[-1])
        if block is not None:
            ok, why = fits_block(k, y_val.dtype, block)
        else:
            ok, why = fits(k, y_val.dtype) if rot is None else fits_rotated(k, y_val.dtype, rot.args[2])
        if not ok:
            refused.add(why)
            continue
        a, b = x, None
        if (is_call(x, aten.add.Tensor) and len(x.users) == 1 and not x.kwargs
                and all(isinstance(t, Node) and _same_shape(t, ln) for t in x.args[:2])):
            a, b = x.args[0], x.args[1]
        quant = (arg(q, "bits"), arg(q, "symmetric"), arg(q, "clip_lo"), arg(q, "clip_hi"), arg(q, "backend"))
        # rotated: at the rotate, after its signs (a get_attr rotate_inputs placed right after the LayerNorm)
        with graph.inserting_before(ln if rot is None else rot):
            if rot is None:
                node = graph.call_function(_FUSED, (a, b, weight, bias, float(eps), *quant),
                                           {} if block is None else {"act_block": block})
            else:
                node = graph.call_function(_FUSED_ROTATED, (a, b, weight, bias, float(eps), rot.args[1], rot.args[2], *quant))
            outs = [graph.call_function(operator.getitem, (node, i)) for i in range(4)]
        outs[0].meta["val"] = y_val
        ln.replace_all_uses_with(outs[0])
        for user in list(q.users):  # getitem(q, i) -> getitem(fused, i + 1)
            user.replace_all_uses_with(outs[user.args[1] + 1])
        fused += 1
        fused_rotated += rot is not None
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.meta[META_FUSED_NORMS] = (fused, "; ".join(sorted(refused)))
    gm.meta[META_FUSED_ROTATED_NORMS] = fused_rotated
    return gm
