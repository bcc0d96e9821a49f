"""The qfx pipelines, declared once: which passes run, in which order, at which level.

::

    L1 aten graph --annotate, rotate_inputs--> L2 --insert_fake_quant--> L3 QAT graph
       --remove_dropout, lower_to_integer--> L4 integer graph (reference ops, any device)
       --fuse_gelu_quantize, fuse_bias_gelu, fuse_qkv, key_padding_attention (GPU), plan,
         fuse_add_layer_norm_quantize (GPU), remove_padding (option)--> L5 target graph

Each pass is ``GraphModule -> GraphModule`` (qfx.passes); here each is wrapped to take the
one :class:`PassContext`. :func:`run_passes` lints after every pass and, when one fails,
names it and the passes that ran before it. ``qfx.compile(..., tune=...)`` runs
:data:`COMPILE_PASSES` in two calls: the autotuner reads the graph annotate made (L2) and keeps
the parts where fp16 is faster in float (``qfx.passes.annotate.keep_float``), then the rest runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import GraphModule

from qfx.config import QuantConfig
from qfx.passes.annotate import annotate
from qfx.passes.dropout import dropout_to_modules, remove_dropout
from qfx.passes.expose_features import expose_features
from qfx.passes.fake_quant import insert_fake_quant
from qfx.passes.fuse_gelu import fuse_bias_gelu, fuse_gelu_quantize
from qfx.passes.attention import key_padding_attention
from qfx.passes.fuse_norm_quant import fuse_add_layer_norm_quantize
from qfx.passes.fuse_qkv import fuse_qkv
from qfx.passes.lower_integer import lower_to_integer
from qfx.passes.plan import plan
from qfx.passes.rotate_inputs import rotate_inputs
from qfx.passes.unpad import remove_padding
from qfx.schema import META_PASSES
from qfx.targets import Target

__all__ = ["PassContext", "QAT_PASSES", "TRAIN_PASSES", "COMPILE_PASSES", "run_passes", "QfxPassError"]


@dataclass
class PassContext:
    config: QuantConfig | None
    skip: tuple[str, ...] = ()
    target: Target | None = None
    master_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    float_dtype: torch.dtype = torch.float32  # what the float parts of the target graph run in
    remove_padding: bool | str = False  # "auto" / True: token-wise ops on the real tokens only (passes/unpad.py)
    #: compiling a QAT model whose weights prepare_qat rotated (weight name -> block): only the
    #: inputs are rotated again (passes/rotate_inputs.py)
    rotated_weights: dict[str, int] | None = None


Pass = tuple[str, Callable[[GraphModule, PassContext], GraphModule]]

_ANNOTATE: Pass = ("annotate", lambda gm, c: annotate(gm, c.config, c.skip))
_FAKE_QUANT: Pass = ("insert_fake_quant", lambda gm, c: insert_fake_quant(gm))
_ROTATE: Pass = ("rotate_inputs", lambda gm, c: rotate_inputs(gm, c.master_weights, c.rotated_weights))

#: capture -> QAT graph (L3), trainable
QAT_PASSES: tuple[Pass, ...] = (
    _ANNOTATE,
    _ROTATE,
    _FAKE_QUANT,
    ("dropout_to_modules", lambda gm, c: dropout_to_modules(gm)),
)

#: the KD trainer's graphs (qfx.train): the QAT graph (L3, the student) or the captured float
#: graph (L1, the teacher) -> the same graph with feature taps, the last pass before training
#: (identity modules the loss reads; numerics unchanged)
TRAIN_PASSES: tuple[Pass, ...] = (("expose_features", lambda gm, c: expose_features(gm)),)

#: capture -> target graph (L5), for inference
COMPILE_PASSES: tuple[Pass, ...] = (
    _ANNOTATE,
    _ROTATE,
    _FAKE_QUANT,
    ("remove_dropout", lambda gm, c: remove_dropout(gm)),
    ("lower_to_integer", lambda gm, c: lower_to_integer(gm, c.master_weights)),
    ("fuse_gelu_quantize", lambda gm, c: fuse_gelu_quantize(gm)),
    ("fuse_bias_gelu", lambda gm, c: fuse_bias_gelu(gm)),
    ("fuse_qkv", lambda gm, c: fuse_qkv(gm)),
    ("key_padding_attention", lambda gm, c: key_padding_attention(gm, c.float_dtype) if c.target.device == "cuda" else gm),
    ("plan", lambda gm, c: plan(gm, c.target)),
    ("fuse_add_layer_norm_quantize",
     lambda gm, c: fuse_add_layer_norm_quantize(gm, c.float_dtype) if c.target.device == "cuda" else gm),
    # last: it changes the token dims of what it packs, and the passes above match on the
    # padded graph's shapes (fuse_add_layer_norm_quantize compares them)
    ("remove_padding", lambda gm, c: remove_padding(gm) if c.remove_padding else gm),
)


class QfxPassError(RuntimeError):
    """A pass failed; the message names it and the passes before it."""


def run_passes(gm: GraphModule, passes: tuple[Pass, ...], ctx: PassContext, stop_after: str | None = None,
               start_after: str | None = None) -> GraphModule:
    """Run ``passes`` in order: those after ``start_after`` (from the first when None) up to and
    including ``stop_after`` (to the last when None).

    A pipeline run in two calls, the graph read between them (``qfx.compile`` hands the tuner
    the annotated graph: ``stop_after="annotate"``, then ``start_after="annotate"``), records
    and names its passes as one call does.
    """
    names = [name for name, _ in passes]
    for which, asked in (("stop_after", stop_after), ("start_after", start_after)):
        if asked is not None and asked not in names:
            raise ValueError(f"run_passes({which}={asked!r}): no such pass; the passes are {names}")
    first = names.index(start_after) + 1 if start_after is not None else 0
    done: list[str] = []
    for name, fn in passes[first:]:
        try:
            gm = fn(gm, ctx)
            gm.graph.lint()
        except ValueError:
            raise  # bad input: the pass's own message names the parameter
        except Exception as e:
            before = names[:first] + done
            raise QfxPassError(f"pass {name!r} failed after {before or 'no passes'}: {type(e).__name__}: {e}") from e
        done.append(name)
        if name == stop_after:
            break
    gm.meta[META_PASSES] = tuple(gm.meta.get(META_PASSES, ())) + tuple(done)
    return gm
