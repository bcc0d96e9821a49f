"""The bytes of a qfx file: a safetensors file read under fixed limits, and its checksum.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (each
tensor's dtype, shape and byte range, and string metadata) and the tensor bytes. Before
anything else is parsed or allocated, :func:`read` checks the header against the file:

* ``n`` at most :data:`MAX_HEADER_BYTES` (the header is read into memory whole) and inside the
  file;
* the header is a JSON object (nesting deeper than Python's recursion limit is refused, not
  crashed on) of string metadata and tensor entries, each with a dtype qfx writes, at most
  :data:`MAX_RANK` non-negative dims, and a byte range inside the file whose length is exactly
  the shape's size: no tensor can ask for more memory than the file holds.

Only then does safetensors read the tensors (memory bounded by the file's size).

``qfx.sha256`` (:func:`digest`) covers the metadata and every tensor. It is not keyed: it
detects a damaged or truncated file, not a deliberate edit (anyone can recompute it). What keeps
an edited file from running code is :mod:`qfx.runtime.allowlist`.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["QfxFileError", "FORMAT_VERSION", "MAX_HEADER_BYTES", "MAX_NODES", "MAX_RANK", "read", "digest",
           "parse_json", "fail", "META"]

#: version 2: the runtime settings (buckets, CUDA graphs, target) are stored (``qfx.runtime``)
FORMAT_VERSION = "2"
#: the metadata key prefix: ``qfx.format``, ``qfx.graph``, ...
META = "qfx"
#: the largest safetensors header read (a BERT-large graph document is under 1 MiB)
MAX_HEADER_BYTES = 32 << 20
#: the most graph nodes a file may hold (BERT-large has about 2,500)
MAX_NODES = 100_000
#: the highest tensor rank in a file
MAX_RANK = 8
#: bytes per element of the safetensors dtypes qfx writes
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}


class QfxFileError(ValueError):
    """A qfx file cannot be loaded: the message names the file and the problem."""


def fail(path, problem: str) -> QfxFileError:
    return QfxFileError(f"qfx.load({str(path)!r}): {problem}")


def parse_json(text: Any, what: str) -> Any:
    """``json.loads`` of a metadata string; ValueError (never RecursionError) when it is not JSON."""
    if not isinstance(text, str):
        raise ValueError(f"{what} is missing")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is JSON nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"{what} is not JSON ({e})") from None


def _check_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise fail(path, f"not a complete safetensors file (truncated or corrupt): {size} bytes")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise fail(path, f"the safetensors header claims {n} bytes, more than qfx reads ({MAX_HEADER_BYTES}); "
                             "not a qfx file (or a corrupt one)")
        if 8 + n > size:
            raise fail(path, f"not a complete safetensors file (truncated or corrupt): the header claims {n} bytes, "
                             f"the file has {size - 8}")
        raw = f.read(n)
    try:
        header = parse_json(raw.decode("utf-8"), "the safetensors header")
        _check_entries(header, size - 8 - n)
    except (ValueError, UnicodeDecodeError) as e:
        raise fail(path, f"not a valid safetensors file (truncated or corrupt): {e}") from None


def _check_entries(header: Any, data_bytes: int) -> None:
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("the metadata is not a map of strings")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r}: entry is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEM_BYTES:
            raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not one qfx writes {sorted(_ITEM_BYTES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(type(d) is int and 0 <= d < 2**40 for d in shape)):
            raise ValueError(f"tensor {name!r}: shape {str(shape)[:80]} is not at most {MAX_RANK} non-negative sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ValueError(f"tensor {name!r}: byte range {str(offsets)[:80]} is outside the file's {data_bytes} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * _ITEM_BYTES[dtype]:
            raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} does not fill its byte range {offsets}")


def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The string metadata and the tensors of the safetensors file ``path``, after the checks
    above; QfxFileError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if path.is_dir():
        raise fail(path, "this is a directory, not a qfx file; give the path of the file qfx.save wrote "
                         f"(e.g. {str(path / 'model.qfx.safetensors')!r})")
    if not path.exists():
        raise fail(path, "no such file")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise fail(path, f"not a complete safetensors file (truncated or corrupt): {e}") from None
    return meta, tensors


def digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata (but ``qfx.sha256``) and every tensor's name, dtype, shape and
    bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(meta):
        if key != f"{META}.sha256":
            h.update(key.encode())
            h.update(meta[key].encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
