"""Composing W4A4 with other compression (the paper's section 6): 2:4 pruning, layer reduction.

* **2:4 pruning, P=>Q, static l1 mask** (6.1, Table B.3 "Static (weight)"): in every group of
  4 consecutive weights along K of each quantized linear, the 2 of largest magnitude in the
  *teacher* are kept. The mask is applied to the student's float weights in place and kept
  through training (gradients are masked and the mask re-applied after each step), so the
  fake-quant sees ``Quant(Prune(W))`` and ``qfx.compile`` quantizes the same masked weights.
* **Layer reduction** (6.2): keep ``k`` of the teacher's ``n`` layers (by default the last of
  each of ``k`` equal blocks, so the last layer is always kept) and distil layer ``j`` of the
  student from teacher layer ``keep[j]`` (:func:`qfx.train.distill`'s ``layer_map``).

Example::

    >>> student = qfx.train.make_student(teacher, qfx.QuantConfig(4, 4), batch)
    >>> masks = two_four_masks(student, teacher); keeper = SparsityKeeper(student, masks)
    >>> qfx.train.distill(teacher, student, train, dev, cfg, post_step=keeper.reapply)
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from qfx.schema import META_LINEAR, LinearInfo, linear_nodes

__all__ = ["two_four_mask", "two_four_masks", "SparsityKeeper", "sparsity", "default_keep", "reduce_layers", "encoder_layers"]

_N, _M = 2, 4  # keep N of every M weights (NVIDIA's 2:4 semi-structured sparsity)


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """Bool mask of ``w`` [N, K] keeping the 2 largest |w| of every 4 consecutive along K.

    Ties go to the lower index (``topk`` on a stable sort), so the mask is deterministic.
    """
    if w.dim() != 2 or w.shape[1] % _M:
        raise ValueError(f"2:4 pruning needs a 2-D weight whose K is a multiple of {_M}; got shape {tuple(w.shape)}")
    groups = w.detach().abs().reshape(w.shape[0], -1, _M)
    keep = groups.argsort(dim=-1, descending=True, stable=True)[..., :_N]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(w.shape)


def _quantized_weights(student: GraphModule) -> list[str]:
    """Qualified weight names of the linears the student quantizes (``meta["qfx"].spec``)."""
    names = []
    for node in linear_nodes(student):
        info: LinearInfo | None = node.meta.get(META_LINEAR)
        if info is not None and info.spec is not None:
            names.append(info.weight)
    return names


def two_four_masks(student: GraphModule, teacher: nn.Module) -> dict[str, torch.Tensor]:
    """Static l1 2:4 masks from ``teacher``'s weights for every quantized linear of ``student``.

    ``teacher`` is the float model (or any module with the same parameter names, e.g. its
    qfx capture); names are matched as qualified parameter names, which qfx graphs keep.
    """
    t_params = dict(teacher.named_parameters())
    masks = {}
    for name in _quantized_weights(student):
        if name not in t_params:
            raise ValueError(f"teacher has no parameter {name!r}: teacher and student architectures differ")
        s_shape = student.get_parameter(name).shape
        if t_params[name].shape != s_shape:
            raise ValueError(f"{name}: teacher shape {tuple(t_params[name].shape)} != student shape {tuple(s_shape)}")
        masks[name] = two_four_mask(t_params[name]).to(student.get_parameter(name).device)
    if not masks:
        raise ValueError("the student quantizes no linear: nothing to prune")
    return masks


class SparsityKeeper:
    """Holds masked weights at zero: zeroes them now, masks their gradients, and ``reapply()``
    (call after each optimizer step) re-zeroes them against any update that is not
    gradient-driven (weight decay of an exact zero is zero, but other optimizers may differ)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self._pairs = [(model.get_parameter(n), m) for n, m in masks.items()]
        self._handles = [p.register_hook(lambda g, m=m: g * m) for p, m in self._pairs]
        self.reapply()

    @torch.no_grad()
    def reapply(self) -> None:
        for p, m in self._pairs:
            p.mul_(m)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def sparsity(model: nn.Module, names: Sequence[str]) -> float:
    """Fraction of exact zeros over the named parameters."""
    ps = [model.get_parameter(n) for n in names]
    return sum(int((p == 0).sum()) for p in ps) / max(sum(p.numel() for p in ps), 1)


def default_keep(n: int, k: int) -> tuple[int, ...]:
    """The last layer of each of ``k`` equal blocks of ``n`` layers: (1, 3, 5) for 3 of 6."""
    if not 1 <= k <= n:
        raise ValueError(f"keep {k} of {n} layers: need 1 <= k <= {n}")
    return tuple((i + 1) * n // k - 1 for i in range(k))


def encoder_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The ``nn.ModuleList`` of encoder layers: the one holding ``config.num_hidden_layers``
    modules of a single class (found by structure, whatever the architecture calls it)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n and len({type(m) for m in child}) == 1:
                return parent, attr, child
    raise ValueError(f"{type(model).__name__}: no ModuleList of config.num_hidden_layers={n} identical layers; cannot reduce layers")


def reduce_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A deep copy of ``model`` keeping only encoder layers ``keep`` (in that order).

    The copy's ``config.num_hidden_layers`` is updated; embeddings, pooler and head are kept.
    """
    _, _, layers = encoder_layers(model)
    keep = tuple(keep)
    if not keep or sorted(set(keep)) != list(keep) or keep[-1] >= len(layers) or keep[0] < 0:
        raise ValueError(f"keep={keep}: need increasing layer indices in [0, {len(layers)})")
    out = copy.deepcopy(model)
    parent, attr, layers = encoder_layers(out)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    out.config.num_hidden_layers = len(keep)
    return out
