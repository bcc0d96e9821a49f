"""Triton kernels, beside the CUDA ones: weight-only 4-bit GEMMs for decoders
(:mod:`.weight_only`), the block-Hadamard rotation (:mod:`.rotation`) and the fused
rotate + quantize kernels (:mod:`.rotation_quant`).

Triton is optional (CUDA builds of torch ship it). :data:`HAS_TRITON` says whether it is importable;
it is imported on first use of a kernel, not here: whether it interprets on the CPU
(``TRITON_INTERPRET=1``) is fixed when it is first imported, and that is for the caller to choose.
"""
import importlib.util

#: Triton is importable (it comes with CUDA builds of torch).
HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON", "TunedTables"]


class TunedTables:
    """Measured kernel choices by the compute capability they were measured on (``files``: capability ->
    JSON written by a benchmark's ``--tuned-out``), read with ``load`` once per CUDA device; ``default``
    for the CPU (the interpreter) and for GPUs no file covers. Shared by the block GEMM's tiles and the
    varlen attention's choice."""

    def __init__(self, files: dict, load, default) -> None:
        self.files, self.load, self.default = files, load, default
        self._by_device: dict[int, object] = {}

    def for_device(self, device):
        if device is None or getattr(device, "type", "cpu") != "cuda":
            return self.default
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._by_device:
            path = self.files.get(torch.cuda.get_device_capability(index))
            self._by_device[index] = self.load(path) if path is not None and path.exists() else self.default
        return self._by_device[index]

    def replace(self, index: int, table) -> None:
        """Use ``table`` on CUDA device ``index`` from now on (a benchmark that has just measured it)."""
        self._by_device[index] = table
