"""GPTQ initialisation of an encoder's QAT graph: the calibration driver over
:mod:`qfx.numerics.gptq` (whose maths it calls).

It lives in qfx.train, above the API, because it reads what :func:`qfx.prepare_qat` built (the
graph's stage, its linears' specs, the activation quantizers) and reaches the encoder of a
wrapper (a ``SentenceTransformer``) through the adapter its package registered with
:mod:`qfx.api`; the numerics floor stays free of both.

Example::

    >>> from qfx.train.gptq_init import gptq_init
    >>> qat = qfx.prepare_qat(st, config=qfx.QuantConfig(4, 4, symmetric=False, rotation=128))
    >>> gptq_init(qat, train_texts[:256])
"""
from __future__ import annotations

import torch
from torch import nn

from qfx import numerics as nx
from qfx.api import is_qat_model, wrapper_adapter_of
from qfx.numerics.fake_quant import ActFakeQuant
from qfx.numerics.gptq import GPTQConfig, collect_hessians, gptq_quantize_weight, quantize_error
from qfx.schema import META_LINEAR, LinearInfo, linear_nodes

__all__ = ["gptq_init"]


@torch.no_grad()
def gptq_init(qat: nn.Module, calibration, damp: float = 0.01, col_block: int = 128) -> dict[str, tuple[float, float]]:
    """GPTQ-round the 4-bit weights of a :func:`qfx.prepare_qat` encoder in place, before QAT (or a
    compile without training): the starting point QAT refines, instead of round-to-nearest.

    ``qat``: the QAT graph of an encoder (then ``calibration`` is an iterable of keyword-argument
    dicts for ``qat(**batch)``) or a wrapper from ``qfx.prepare_qat`` (a ``SentenceTransformer``:
    then ``calibration`` is what its adapter runs, a list of texts through its ``encode``).
    Every quantized linear needs 4-bit weights and quantized activations (its input is read
    where the activation quantizer reads it: after the input rotation of
    ``QuantConfig(rotation=b)``, before rounding).

    Per linear, ``H = 2 X^T X / T`` over the calibration tokens (padding included), GPTQ on the
    qfx grid (symmetric int4, ``S = max|w| / 7`` per row or per ``weight_group``), and the weight
    replaced by its GPTQ-dequantized value ``S q``. The fake-quant recomputes ``S`` from that
    weight, so a row whose extreme code moved off +-7 (a few percent of rows) is re-rounded on a
    slightly different grid: the first QAT steps absorb it; the returned objectives are those of
    GPTQ's own codes.

    Returns ``{weight name: (round-to-nearest objective, GPTQ objective)}``, the GPTQ objective
    ``tr((W - W_hat) H (W - W_hat)^T)`` (:func:`qfx.numerics.gptq.quantize_error`) of both roundings.

    Example::

        >>> qat = qfx.prepare_qat(st, config=qfx.QuantConfig(4, 4, symmetric=False, rotation=128))
        >>> gptq_init(qat, train_texts[:256])
        >>> qfx.embeddings.distill(st, qat, train_texts, cfg)
    """
    adapter = wrapper_adapter_of(qat)
    gm = adapter.encoder_of(qat) if adapter is not None else qat
    if not (isinstance(gm, torch.fx.GraphModule) and is_qat_model(gm)):
        raise ValueError("gptq_init: qat must be the result of qfx.prepare_qat (an encoder's QAT graph or a "
                         f"SentenceTransformer holding one), got {type(qat).__name__}")
    readers = _activation_readers(gm)
    if adapter is not None:  # the wrapper runs on its own input form (texts), hooks see the encoder
        run, batches = (lambda data: adapter.run(qat, data)), [{"data": calibration}]
    else:
        run, batches = gm, calibration
    was_training = gm.training
    gm.eval()
    try:
        hessians = collect_hessians(run, batches, {name: gm.get_submodule(name) for name in readers})
    finally:
        gm.train(was_training)
    # a weight several linears read (ALBERT) gets the mean of their inputs' Hessians
    per_weight: dict[str, tuple[LinearInfo, list[torch.Tensor]]] = {}
    for name, infos in readers.items():
        for info in infos:
            per_weight.setdefault(info.weight, (info, []))[1].append(hessians[name])
    out = {}
    for weight, (info, hs) in per_weight.items():
        w = gm.get_parameter(weight)
        h = torch.stack(hs).mean(0)
        group = info.spec.group_size or w.shape[1]
        cfg = GPTQConfig("int4", group_size=group, damp=damp, col_block=col_block)
        w_hat = nx.dequantize_weight_4bit(gptq_quantize_weight(w, h, cfg)).to(w.dtype)
        rtn = nx.fake_quantize(w.detach().float(), 4, True, info.spec.group_size)
        out[weight] = (quantize_error(w, rtn, h), quantize_error(w, w_hat, h))
        w.copy_(w_hat)
    return out


def _activation_readers(gm: torch.fx.GraphModule) -> dict[str, list[LinearInfo]]:
    """ActFakeQuant module name -> the quantized linears reading its input (their LinearInfo);
    refuses a linear GPTQ cannot round here (not 4-bit weights with quantized activations)."""
    readers: dict[str, list[LinearInfo]] = {}
    for node in linear_nodes(gm):
        info = node.meta.get(META_LINEAR)
        if info is None or info.spec is None:
            continue
        x = node.args[0]
        holder = gm.get_submodule(x.target) if isinstance(x, torch.fx.Node) and x.op == "call_module" else None
        if info.spec.weight_bits != 4 or not isinstance(holder, ActFakeQuant):
            raise ValueError(f"gptq_init rounds 4-bit weights of linears with quantized activations; linear {info.name} "
                             f"is {info.spec.precision}: use QuantConfig(weight_bits=4, act_bits=4 or 8)")
        readers.setdefault(x.target, []).append(info)
    if not readers:
        raise ValueError("gptq_init: the model has no quantized linear (every part left in float)")
    return readers
