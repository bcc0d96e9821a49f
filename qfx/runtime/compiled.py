"""CompiledModel: the user-facing result of qfx.compile (same inputs and outputs as the model)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from qfx.capture import CaptureInfo, normalize_inputs
from qfx.report import CompileReport

__all__ = ["CompiledModel"]


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


class CompiledModel(nn.Module):
    """Runs the target graph (L5); ``report()`` says what runs where and in which precision.

    Inputs are checked (empty batch, over-long sequence) and moved to the target's device;
    outputs keep the source model's structure (e.g. ``SequenceClassifierOutput``).
    """

    def __init__(self, graph_module: GraphModule, report: CompileReport, capture: CaptureInfo, device: torch.device) -> None:
        super().__init__()
        self.graph_module = graph_module
        # An inference artifact: integer ops have no autograd formula, and float parameters
        # left in the graph must not ask for one (torch.export would trace a backward).
        graph_module.requires_grad_(False)
        self._report = report
        self._capture = capture
        self.device = device
        self.eval()

    def report(self) -> CompileReport:
        return self._report

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = normalize_inputs(self._capture, args, kwargs)
        kwargs = {k: _to(v, self.device) for k, v in kwargs.items()}
        with torch.no_grad():
            return self.graph_module(**kwargs)

    def train(self, mode: bool = True) -> "CompiledModel":
        if mode:
            raise ValueError("a CompiledModel is for inference; train the model returned by qfx.prepare_qat instead")
        return super().train(False)
