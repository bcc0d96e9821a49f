r"""GPTQ: Hessian-aware post-training quantization of linear weights (Frantar et al., 2023,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

For one linear layer with weight ``W [N, K]`` and calibration inputs ``X [T, K]`` GPTQ
minimises ``||X W^T - X W_hat^T||^2 = tr((W - W_hat) H (W - W_hat)^T)``, ``H = 2 X^T X / T``,
one input column at a time: quantize column ``k`` to the 4-bit grid, then spread its error
``e = (w_k - q_k) / U[k, k]`` over the not yet quantized columns with the upper Cholesky factor
``U`` of ``H^-1`` (``W[:, j] -= e U[k, j]`` for ``j > k``), lazily in blocks of ``col_block``
columns. ``damp`` adds ``damp * mean(diag H)`` to the diagonal (numerical safety); inputs that
never fire (``H[k, k] = 0``) get ``H[k, k] = 1`` and a zero weight column.

The grid is any format of :mod:`qfx.numerics` (``int4``, ``int4_asym``, ``nf4``, ``fp4``) with
blocks of ``group_size`` consecutive input channels, so a GPTQ weight is stored and run exactly
like a round-to-nearest one (:class:`qfx.numerics.Weight4`):

* without ``act_order`` a group's parameters (scale / absmax, offset) are taken when the
  algorithm reaches the group's first column, from the already error-updated weights;
* with ``act_order`` columns are processed by decreasing ``H[k, k]`` (the most active inputs
  first, while the most freedom is left to compensate), and the group parameters are taken
  from the original weights up front ("static groups"), so that groups stay contiguous in K
  and the packed layout does not change.

With ``double_quant`` the codes are chosen with the fp32 group parameters and the parameters
are then stored double-quantized (as bitsandbytes does for round-to-nearest).

Everything runs on the device of the given tensors (CPU or GPU); the Hessian and the
Cholesky factors are fp64 on the CPU and fp32 on a GPU (as in the reference implementation).
The Hessians come from one forward pass of the float model over the calibration batches (not
the sequential, layer-by-layer variant that feeds already-quantized layers' outputs forward).

Encoders: :func:`qfx.train.gptq_init.gptq_init` GPTQ-rounds the 4-bit weights of a ``qfx.prepare_qat``
model in place with these functions (the Hessians of the inputs its activation quantizers read), the
starting point for QAT or a compile without training; it lives above the API, this module below it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qfx import numerics as nx

__all__ = ["GPTQConfig", "gptq_quantize_weight", "collect_hessians", "quantize_error", "linear_weight", "target_linears"]


@dataclass(frozen=True)
class GPTQConfig:
    """Knobs of :func:`gptq_quantize_weight` (defaults: the GPTQ paper's)."""

    fmt: str = "int4"
    group_size: int = 128
    act_order: bool = False
    damp: float = 0.01
    col_block: int = 128
    double_quant: bool = False

    def __post_init__(self) -> None:
        nx.formats._check_format(self.fmt)
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp={self.damp!r} must be in [0, 1) (a fraction of mean(diag H); GPTQ uses 0.01)")
        if self.col_block <= 0 or self.group_size <= 0:
            raise ValueError(f"col_block={self.col_block!r} and group_size={self.group_size!r} must be positive")


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


def gptq_quantize_weight(w: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig = GPTQConfig()) -> nx.Weight4:
    """GPTQ-quantize ``w [N, K]`` given ``hessian [K, K]`` (``2 X^T X / T``) -> :class:`~qfx.numerics.Weight4`.

    Example::

        >>> x = torch.randn(256, 64); w = torch.randn(32, 64)
        >>> wq = gptq_quantize_weight(w, 2 * x.T @ x / 256, GPTQConfig("int4", group_size=32))
        >>> nx.dequantize_weight_4bit(wq).shape
        torch.Size([32, 64])
    """
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected [K, K] = [{k}, {k}] for w {tuple(w.shape)}")
    g = config.group_size
    nx.formats._blocks(w, g)  # the clear error when g does not divide K
    dt = _work_dtype(w.device)
    W = w.detach().to(dt).clone()
    H = hessian.detach().to(device=w.device, dtype=dt).clone()

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += config.damp * torch.diagonal(H).mean() * torch.eye(k, dtype=dt, device=w.device)

    if config.act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        # Static groups: contiguous groups' parameters from the (dead-column-zeroed) original weights.
        scale, offset = nx.weight_block_params(W.float(), config.fmt, g)
    else:
        perm = torch.arange(k, device=w.device)
        scale = torch.empty(n, k // g, dtype=torch.float32, device=w.device)
        offset = torch.empty_like(scale) if config.fmt == "int4_asym" else None
    W = W[:, perm]
    H = H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    code_dtype = torch.int8 if config.fmt.startswith("int4") else torch.uint8
    codes = torch.empty(n, k, dtype=code_dtype, device=w.device)
    order = perm.tolist()
    for i1 in range(0, k, config.col_block):
        i2 = min(i1 + config.col_block, k)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            grp = col // g
            if not config.act_order and col % g == 0:
                # This group's columns, with every update so far (in-block ones included).
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                s, o = nx.weight_block_params(ahead.float(), config.fmt, g)
                scale[:, grp] = s[:, 0]
                if offset is not None:
                    offset[:, grp] = o[:, 0]
            s_col = scale[:, grp:grp + 1]
            o_col = None if offset is None else offset[:, grp:grp + 1]
            wcol = W1[:, i:i + 1]
            c = nx.encode_weight(wcol.float(), config.fmt, s_col, o_col)
            q = nx.decode_weight(c, config.fmt, s_col, o_col).to(dt)
            codes[:, col] = c[:, 0]
            e = (wcol[:, 0] - q[:, 0]) / U1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return nx.pack_weight4(codes, config.fmt, g, scale, offset, config.double_quant)


def quantize_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """The GPTQ objective ``tr((W - W_hat) H (W - W_hat)^T)`` (= mean output error on the calibration
    tokens times 2), in fp64."""
    d = (w.detach().double() - w_hat.detach().double().to(w.device))
    return float(torch.einsum("nk,kl,nl->", d, hessian.double().to(w.device), d))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of ``module`` as ``[N, K]`` (out, in): nn.Linear's as is, GPT-2 Conv1D's transposed."""
    if isinstance(module, nn.Linear):
        return module.weight
    if _is_conv1d(module):
        return module.weight.T
    raise ValueError(f"module {type(module).__name__} is not an nn.Linear or a GPT-2 Conv1D")


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def target_linears(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> dict[str, nn.Module]:
    """Every nn.Linear / GPT-2 Conv1D of ``model`` by qualified name, except those whose name has a
    component in ``skip`` (by default the LM head, which qfx keeps in float like the embeddings)."""
    skip = set(skip)
    out = {}
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.Linear) or _is_conv1d(mod)) and not (set(name.split(".")) & skip):
            out[name] = mod
    return out


@torch.no_grad()
def collect_hessians(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]] | None, modules: Mapping[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """``H = 2 X^T X / T`` of the input ``X`` of each module in ``modules`` over ``batches``.

    ``batches``: an iterable of keyword-argument dicts for ``model(**batch)`` (e.g. ``input_ids``,
    ``attention_mask``). Raises ValueError when there are none (GPTQ needs calibration data).
    """
    if batches is None:
        raise ValueError("GPTQ needs calibration data: pass calibration=[{'input_ids': ...}, ...] "
                         "(a few hundred sequences of the training distribution)")
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            x = x.to(_work_dtype(x.device))
            if name not in acc:
                acc[name] = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
                count[name] = 0
            acc[name] += x.T @ x
            count[name] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    seen = 0
    try:
        for batch in batches:
            model(**batch)
            seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0 or not acc:
        raise ValueError("GPTQ needs calibration data: the calibration batches were empty; pass at "
                         "least one batch that reaches the quantized linears")
    return {name: 2.0 * acc[name] / count[name] for name in acc}
