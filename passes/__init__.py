"""qfx graph passes: each a function GraphModule -> GraphModule, one per file.

The order they run in is declared once, in :mod:`qfx.pipeline`.
"""
from qfx.passes.annotate import annotate
from qfx.passes.dropout import dropout_to_modules, remove_dropout
from qfx.passes.fake_quant import insert_fake_quant
from qfx.passes.fuse_gelu import fuse_bias_gelu, fuse_gelu_quantize
from qfx.passes.fuse_qkv import fuse_qkv
from qfx.passes.lower_integer import lower_to_integer
from qfx.passes.plan import plan
from qfx.passes.rotate_inputs import rotate_inputs

__all__ = ["annotate", "insert_fake_quant", "dropout_to_modules", "remove_dropout", "lower_to_integer", "fuse_gelu_quantize", "fuse_bias_gelu", "fuse_qkv", "plan", "rotate_inputs"]
