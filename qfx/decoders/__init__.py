"""Decoders (causal LMs): the paper's decoder study and the companion weight-only study.

- :mod:`qfx.decoders.quantize`: weight-only nf4 / fp4 / int4 (and W4A8 / W4A4) quantization of a
  causal LM's linears, decoder QAT + KD.
- :mod:`qfx.decoders.rotate`: Hadamard rotations folded into a Llama-style decoder's weights
  (module level, not an fx pass: decoders are not captured).
- :mod:`qfx.decoders.analysis`: positional perplexity, activation ranges and generation sweeps.
"""
from qfx.decoders.quantize import *  # noqa: F401,F403
from qfx.decoders.quantize import __all__  # noqa: F401
