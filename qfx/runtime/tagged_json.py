"""Tagged JSON: fx argument values and qfx metadata as plain JSON, and back.

JSON has no tuple, dtype, device, slice, non-finite float or dataclass, so each is a one-key
object naming its kind: ``{"node": name}``, ``{"dtype": "float16"}``, ``{"device": "cpu"}``,
``{"layout": "strided"}``, ``{"memory_format": "contiguous_format"}``, ``{"tuple": [...]}``,
``{"slice": [a, b, c]}``, ``{"float": "inf"}``, ``{"dict": {...}}`` and
``{"dataclass": "qfx.schema.LinearInfo", "fields": {...}}``. Lists, strings, ints, finite
floats, booleans and None are themselves.

Decoding builds only these values: dtypes, devices, layouts, memory formats and dataclasses
come from the tables of :mod:`qfx.runtime.allowlist` (never ``getattr(torch, name)`` or an
import of a name from the file), and nesting deeper than
:data:`~qfx.runtime.allowlist.MAX_NESTING` is refused before recursion can run away.

Example::

    >>> decode(encode((1, torch.float16, slice(None, 2))))
    (1, torch.float16, slice(None, 2, None))
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch.fx import Node

from qfx.runtime.allowlist import (MAX_NESTING, dataclass_for, dataclass_tag, device_named, dtype_named,
                                   layout_named, memory_format_named)

__all__ = ["encode", "decode"]

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode(value: Any) -> Any:
    """``value`` as tagged JSON; TypeError for a value a qfx file cannot hold (including a
    dataclass that is not one of qfx's stored dataclasses)."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, Node):
        return {"node": value.name}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"dict with non-string keys {list(value)[:3]}")
        return {"dict": {k: encode(v) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        tag = dataclass_tag(type(value))
        try:
            dataclass_for(tag)
        except ValueError as e:
            raise TypeError(str(e)) from None
        return {"dataclass": tag, "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    raise TypeError(f"cannot store a {type(value).__name__} ({value!r:.80})")


def _dataclass(value: dict, nodes, depth: int):
    if set(value) != {"dataclass", "fields"} or not isinstance(value["fields"], dict):
        raise ValueError(f"dataclass entry with keys {sorted(value)[:4]}, expected dataclass and fields")
    cls = dataclass_for(value["dataclass"])
    fields = {k: decode(v, nodes, depth + 1) for k, v in value["fields"].items()}
    expected = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if set(fields) - expected or required - set(fields):
        raise ValueError(f"{value['dataclass']} has fields {sorted(expected)} in this qfx, the file has {sorted(fields)}")
    return cls(**fields)


def decode(value: Any, nodes: dict[str, Node] | None = None, depth: int = 0) -> Any:
    """The value :func:`encode` stored; ``nodes`` resolves ``{"node": name}`` (a name not in it,
    i.e. not defined earlier in the graph, is refused). ValueError for anything else."""
    if depth > MAX_NESTING:
        raise ValueError(f"JSON nested deeper than {MAX_NESTING} levels")
    if isinstance(value, list):
        return [decode(v, nodes, depth + 1) for v in value]
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"unexpected JSON value of type {type(value).__name__}")
    if "dataclass" in value:
        return _dataclass(value, nodes, depth)
    if len(value) != 1:
        raise ValueError(f"untagged JSON object {sorted(value)[:4]}")
    (tag, body), = value.items()
    if tag == "node":
        if nodes is None or not isinstance(body, str) or body not in nodes:
            raise ValueError(f"reference to node {body!r}, which is not defined before it")
        return nodes[body]
    if tag == "float":
        if body not in _NON_FINITE:
            raise ValueError(f"float tag {body!r} is not inf, -inf or nan")
        return _NON_FINITE[body]
    if tag == "dtype":
        return dtype_named(body)
    if tag == "device":
        return device_named(body)
    if tag == "layout":
        return layout_named(body)
    if tag == "memory_format":
        return memory_format_named(body)
    if tag in ("tuple", "slice") and isinstance(body, list):
        items = tuple(decode(v, nodes, depth + 1) for v in body)
        if tag == "tuple":
            return items
        if len(items) != 3 or not all(v is None or isinstance(v, (int, Node)) for v in items):
            raise ValueError(f"slice {body!r} is not [start, stop, step] of ints, nodes or None")
        return slice(*items)
    if tag == "dict" and isinstance(body, dict):
        return {k: decode(v, nodes, depth + 1) for k, v in body.items()}
    raise ValueError(f"unknown tag {tag!r} (or a malformed body)")
