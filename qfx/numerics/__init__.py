"""The numerics of qfx, written once: every formula the QAT twin, the backends and the tests share.

- :mod:`qfx.numerics.affine`: affine (symmetric / asymmetric) quantization, int4 packing, the
  exact integer GEMM references and the integer linear's fp32 epilogue order.
- :mod:`qfx.numerics.formats`: weight-only 4-bit formats (int4 group-wise, nf4, fp4) and double
  quantization of block scales.
- :mod:`qfx.numerics.rotation`: the block-Hadamard input rotation.

This package re-exports the three, so ``from qfx import numerics`` names every formula.
The modules that *use* the formulas live beside them: :mod:`qfx.numerics.fake_quant` (the QAT
twin's modules) and :mod:`qfx.numerics.gptq` (GPTQ rounding); they are not re-exported.
"""
from qfx.numerics import affine, formats, rotation
from qfx.numerics.affine import *  # noqa: F401,F403
from qfx.numerics.affine import __all__ as _affine_all
from qfx.numerics.formats import *  # noqa: F401,F403
from qfx.numerics.formats import __all__ as _formats_all
from qfx.numerics.rotation import *  # noqa: F401,F403
from qfx.numerics.rotation import __all__ as _rotation_all

__all__ = [*_affine_all, *_formats_all, *_rotation_all]
