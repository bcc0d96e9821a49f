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

__all__ = ["HAS_TRITON"]
