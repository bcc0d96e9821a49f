"""Everything a qfx file may name, and nothing else: the trust boundary of ``qfx.load``.

A qfx file is data: ``qfx.load`` turns the names it holds into objects only through the explicit
tables below, never through ``import`` or an attribute walk over names read from the file:

* call targets (:func:`call_target`): the aten ops qfx's capture and passes emit
  (:data:`ATEN_OPS`), qfx's own ops (:data:`QFX_OPS`) and a few ``operator`` functions on
  sizes (:data:`OPERATOR_FUNCTIONS`). ``torch.load``, ``torch.hub.load``, ``torch.ops.load_library``,
  ``builtins.eval``, ``os.system``, ``operator.attrgetter`` or an op of another library's namespace
  are not there, so a graph cannot call them;
* dataclasses in node metadata and the report (:func:`dataclass_for`): qfx's own, by name;
* dtypes, layouts, memory formats (fixed maps) and devices (``cpu``, ``cuda``, ``cuda:N``, ``meta``);
* pytree node types of the inputs and outputs (:func:`treespec_from_json`): tuple, list, dict
  and Hugging Face ``ModelOutput`` classes, with contexts of plain names;
* names that reach generated Python (fx writes node targets, kwargs keys and argument names
  into the graph's ``forward`` source): identifiers only (:func:`check_identifier`,
  :func:`check_attr_path`), never dunders.

``qfx.save`` applies the same tables, so qfx never writes a file it would refuse to load.
"""
from __future__ import annotations

import functools
import json
import keyword
import operator
import re
from typing import Any, Callable

import torch

__all__ = ["ATEN_OPS", "QFX_OPS", "OPERATOR_FUNCTIONS", "call_target", "target_name", "call_targets",
           "dataclass_for", "dataclass_tag", "DTYPES", "dtype_named", "device_named", "layout_named",
           "memory_format_named", "check_identifier",
           "check_attr_path", "treespec_from_json", "MAX_NESTING"]

#: the aten ops (``name.overload``) a qfx L5 graph may call: what torch.export emits for the
#: supported encoder families (tests/models.py ALL_FAMILIES) and what qfx's passes insert.
#: Pure tensor computations only: no file, process, library or allocator access
#: (``aten.from_file``, ``aten.save`` and ``empty*`` are deliberately absent).
ATEN_OPS = (
    "__and__.Tensor", "_assert_tensor_metadata.default", "_safe_softmax.default", "_softmax.default",
    "_to_copy.default", "_unsafe_view.default", "abs.default", "add.Scalar", "add.Tensor", "add_.Tensor",
    "alias.default", "arange.default", "arange.start", "arange.start_step", "baddbmm.default",
    "bitwise_not.default", "bmm.default", "cat.default", "ceil.default", "chunk.default", "clamp.default",
    "clamp_min.default", "clone.default", "constant_pad_nd.default", "contiguous.default", "cos.default",
    "cumsum.default", "detach.default", "detach_.default", "div.Scalar", "div.Tensor", "div.Tensor_mode",
    "dropout.default", "embedding.default", "eq.Scalar", "eq.Tensor", "erf.default", "exp.default",
    "expand.default", "flatten.using_ints", "full.default", "full_like.default", "gather.default",
    "ge.Scalar", "gelu.default", "gt.Scalar", "index.Tensor", "index_select.default", "layer_norm.default",
    "le.Scalar", "lift_fresh_copy.default", "linalg_vector_norm.default", "linear.default", "log.default",
    "logical_not.default", "lt.Scalar", "masked_fill.Scalar", "masked_fill.Tensor", "matmul.default",
    "max.other", "mean.dim", "min.other", "mul.Scalar", "mul.Tensor", "ne.Scalar", "neg.default",
    "new_ones.default", "new_zeros.default", "ones.default", "ones_like.default", "permute.default",
    "pow.Tensor_Scalar", "relu.default", "repeat.default", "reshape.default", "rsqrt.default",
    "rsub.Scalar", "scalar_tensor.default", "scaled_dot_product_attention.default", "select.int",
    "sigmoid.default", "sign.default", "silu.default", "sin.default", "slice.Tensor", "softmax.int",
    "split.Tensor", "split_with_sizes.default", "sqrt.default", "squeeze.dim", "sub.Scalar", "sub.Tensor",
    "sum.dim_IntList", "sym_size.int", "t.default", "tanh.default", "to.device", "to.dtype",
    "to.dtype_layout", "transpose.int", "type_as.default", "unbind.int", "unsqueeze.default",
    "view.default", "where.ScalarOther", "where.ScalarSelf", "where.self", "zeros.default",
    "zeros_like.default",
)
#: qfx's own ops (``qfx::<name>``, default overload); tests/e2e/test_untrusted_files.py checks
#: that every qfx op this qfx registers is listed here
QFX_OPS = ("quantize", "int_matmul", "int_linear", "weight_only_linear", "add_layer_norm_quantize",
           "add_layer_norm_rotate_quantize", "rotate", "token_index", "pack_tokens", "repad_tokens",
           "packed_attention")
#: ``operator`` functions on sizes and tuples (export's symbolic shape arithmetic, getitem of
#: multi-output ops); no ``pow`` (unbounded integers), no ``attrgetter`` / ``methodcaller``
OPERATOR_FUNCTIONS = ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "eq", "ne",
                      "lt", "le", "gt", "ge")

#: the deepest JSON nesting a qfx file may hold (its real documents stay under 12)
MAX_NESTING = 64


def target_name(target: Callable) -> str:
    """The name a call target is stored under: ``torch.ops.<ns>.<op>.<overload>`` for ops,
    ``_operator.<fn>`` for operator functions, else its qualified name."""
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    from torch.fx.node import _get_qualified_name

    return _get_qualified_name(target)


@functools.cache
def call_targets() -> dict[str, Callable]:
    """Stored name -> callable, built from the tables (never from a file)."""
    import qfx.passes.attention  # noqa: F401  (registers qfx::packed_attention)

    out: dict[str, Callable] = {}
    for spec in ATEN_OPS:
        name, overload = spec.split(".")
        op = getattr(getattr(torch.ops.aten, name), overload)
        out[target_name(op)] = op
    for name in QFX_OPS:
        op = getattr(torch.ops.qfx, name).default
        out[target_name(op)] = op
    for name in OPERATOR_FUNCTIONS:
        fn = getattr(operator, name)
        out[f"_operator.{name}"] = fn
    return out


def call_target(name: Any, node: str) -> Callable:
    """The callable stored as ``name`` by node ``node``; ValueError naming both when the name
    is not in the allowlist."""
    fn = call_targets().get(name) if isinstance(name, str) else None
    if fn is None:
        raise ValueError(f"node {node!r} calls {name!r}, which is not in qfx's allowlist of call targets "
                         "(qfx/runtime/allowlist.py: the aten and qfx ops and operator functions qfx graphs use); "
                         "a qfx file never calls anything else")
    return fn


@functools.cache
def _dataclasses() -> dict[str, type]:
    from qfx.passes.plan import PlanChoice
    from qfx.runtime.buckets import Buckets
    from qfx.runtime.report import CompileReport, LinearRow
    from qfx.schema import LinearInfo, QuantSpec
    from qfx.tune.plan_report import BucketTotal, PartTiming, TuningTable

    classes = (LinearInfo, QuantSpec, PlanChoice, CompileReport, LinearRow, Buckets, TuningTable, PartTiming,
               BucketTotal)
    return {dataclass_tag(c): c for c in classes}


def dataclass_tag(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def dataclass_for(tag: Any) -> type:
    """The qfx dataclass stored as ``tag`` (``"qfx.schema.LinearInfo"``); nothing is imported
    by name from the file."""
    cls = _dataclasses().get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ValueError(f"dataclass {tag!r} is not one of qfx's stored dataclasses {sorted(_dataclasses())}")
    return cls


DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
        torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
}
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
                  "channels_last": torch.channels_last}
_DEVICE = re.compile(r"(cpu|meta|cuda)(:[0-9]{1,2})?")
_INDEX = re.compile(r"[0-9]{1,9}")


def _named(table: dict, what: str, name: Any):
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{what} {name!r} is not one of {sorted(table)}")
    return table[name]


def dtype_named(name: Any) -> torch.dtype:
    return _named(DTYPES, "dtype", name)


def layout_named(name: Any) -> torch.layout:
    return _named(LAYOUTS, "layout", name)


def memory_format_named(name: Any) -> torch.memory_format:
    return _named(MEMORY_FORMATS, "memory format", name)


def device_named(name: Any) -> torch.device:
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ValueError(f"device {name!r} is not 'cpu', 'cuda', 'cuda:N' or 'meta'")
    return torch.device(name)


def check_identifier(what: str, name: Any) -> str:
    """``name`` if it is a Python identifier, not a keyword and not a dunder (fx writes it into
    generated source); ValueError naming ``what`` otherwise."""
    if (not isinstance(name, str) or not name.isidentifier() or not name.isascii() or keyword.iskeyword(name)
            or name.startswith("__") or len(name) > 200):
        raise ValueError(f"{what} {name!r} is not a plain identifier (letters, digits, '_'; no dunder)")
    return name


def check_attr_path(what: str, path: Any) -> str:
    """A dotted attribute path of plain identifiers or indices (``layer.0.ffn_in.w_codes``)."""
    if not isinstance(path, str) or len(path) > 1000:
        raise ValueError(f"{what} {path!r} is not a dotted path of identifiers")
    for part in path.split("."):
        if not _INDEX.fullmatch(part):  # a ModuleList index: fx writes getattr(m, "0")
            check_identifier(f"{what} {path!r}: part", part)
    return path


# ----------------------------------------------------------------------------------------------
# pytree specs of the graph's inputs and outputs, without torch's treespec_loads (its enum hook
# imports any module a spec names)

_CONTAINERS = {"builtins.tuple": tuple, "builtins.list": list, "builtins.dict": dict}
_MODEL_OUTPUT_MODULE = re.compile(r"transformers\.(modeling_outputs|models\.[a-z0-9_]+\.modeling_[a-z0-9_]+)")


def _node_type(name: Any) -> type:
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    if name in _CONTAINERS:
        return _CONTAINERS[name]
    module, _, cls = name.rpartition(".") if isinstance(name, str) else ("", "", "")
    if not _MODEL_OUTPUT_MODULE.fullmatch(module):
        raise ValueError(f"pytree node type {name!r} is not a tuple, list, dict or transformers ModelOutput")
    if name not in SERIALIZED_TYPE_TO_PYTHON_TYPE:
        # a model-specific output class registers itself when transformers' own modeling module
        # is imported: the installed library's module, matched by the pattern above
        import importlib

        importlib.import_module(module)
    from transformers.utils import ModelOutput

    typ = SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name)
    if not (isinstance(typ, type) and issubclass(typ, ModelOutput)):
        raise ValueError(f"pytree node type {name!r} is not a transformers ModelOutput")
    return typ


def treespec_from_json(text: Any, depth: int = 0):
    """A TreeSpec from ``torch.utils._pytree.treespec_dumps`` output, reading only tuple, list,
    dict and ModelOutput nodes whose contexts are None or lists of identifiers."""
    from torch.utils._pytree import TreeSpec, tree_structure

    leaf = tree_structure(0)

    def build(node: Any, depth: int):
        if depth > MAX_NESTING:
            raise ValueError(f"pytree spec nested deeper than {MAX_NESTING}")
        if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            raise ValueError("pytree spec node is not {type, context, children_spec}")
        children = node["children_spec"]
        if not isinstance(children, list):
            raise ValueError("pytree spec children are not a list")
        if node["type"] is None and node["context"] is None and not children:
            return leaf
        typ = _node_type(node["type"])
        context = json.loads(node["context"]) if isinstance(node["context"], str) else None
        if typ in (tuple, list):
            if context is not None:
                raise ValueError(f"pytree {typ.__name__} node with a context")
        elif not (isinstance(context, list) and len(context) == len(children)):
            raise ValueError(f"pytree {node['type']} node's context is not one key per child")
        else:
            for key in context:
                check_identifier(f"pytree {node['type']} key", key)
        return TreeSpec(typ, context, [build(c, depth + 1) for c in children])

    if not isinstance(text, str):
        raise ValueError("pytree spec is not a string")
    doc = json.loads(text)
    if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == 1):
        raise ValueError("pytree spec is not [protocol 1, node]")
    return build(doc[1], depth)
