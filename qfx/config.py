"""User-facing quantization configuration, validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

__all__ = ["QuantConfig", "ROLES", "MODES", "config_for_mode", "precision_tag", "parse_mode", "mode_of"]

#: Parts of a transformer layer whose linears qfx quantizes, in layer order.
ROLES = ("qkv", "attn_out", "ffn_in", "ffn_out")
#: Linears outside the encoder layers (embedding projections, pooler, classifier heads).
OTHER_ROLE = "other"

MODES = ("int4", "int8", "fp16")
#: QuantConfig fields newer than the checkpoint fingerprint: in its repr only when not default
_SHOWN_WHEN_SET = ("rotation", "act_block")


@dataclass(frozen=True)
class QuantConfig:
    """How weights and activations of each quantized linear are quantized.

    Args:
        weight_bits: 4 or 8. Weights are quantized symmetrically.
        act_bits: 4 or 8 (token-wise dynamic), or 16 (activations stay float: weight-only).
        symmetric: activation scheme; ``False`` is asymmetric min/max per token.
        weight_group: ``"row"`` (one scale per output channel) or an int group size that
            divides every quantized linear's input dimension K.
        act_granularity: only ``"token"`` (dynamic min/max per token), as in the paper.
        act_clip: ``None`` or ``(lo, hi)``: activations are clamped before quantization.
        roles: which layer parts are quantized (subset of ``ROLES``); the others stay float
            and the compile report says so.
        quantize_other: also quantize linears outside the encoder layers (pooler, heads).
        rotation: ``None`` (off) or a power-of-two block size ``b`` such as 128: every quantized
            linear reads its input rotated by a fixed orthogonal ``R`` (random signs times a
            block-diagonal Hadamard matrix of blocks ``b``; :mod:`qfx.passes.rotate_inputs`),
            its weight rotated to match (``W R``), so the float function is unchanged while
            outlier channels are spread before the token-wise quantizer sees them. Costs one
            fast Walsh-Hadamard transform (one Triton kernel on a GPU) per distinct linear
            input. ``b`` must divide every quantized linear's K.
        act_block: ``None`` (token-wise: one scale and offset per token, the paper's setting
            and the default) or a block size such as 128: one scale (and, asymmetric, one
            offset) per token per block of ``act_block`` consecutive input channels, each block's
            exact int32 accumulator promoted to fp32 with its own scale
            (:func:`qfx.numerics.int_linear_blocks_reference` states the order). Must divide
            every quantized linear's K; with grouped weights, ``weight_group`` must be a
            multiple of it (each block lies inside one weight group).

    Example::

        >>> QuantConfig(weight_bits=4, act_bits=4, symmetric=False)
    """

    weight_bits: int = 4
    act_bits: int = 4
    symmetric: bool = True
    weight_group: str | int = "row"
    act_granularity: str = "token"
    act_clip: tuple[float, float] | None = None
    roles: tuple[str, ...] = field(default=ROLES)
    quantize_other: bool = False
    rotation: int | None = None
    act_block: int | None = None

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8):
            raise ValueError(
                f"QuantConfig(weight_bits={self.weight_bits!r}): weights are quantized to 4 or 8 "
                "bits; to keep a part in float, leave its role out of `roles` instead"
            )
        if self.act_bits not in (4, 8, 16):
            raise ValueError(
                f"QuantConfig(act_bits={self.act_bits!r}): use 4 or 8 (integer activations) "
                "or 16 (float activations, weight-only quantization)"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantConfig(symmetric={self.symmetric!r}) must be True or False")
        wg = self.weight_group
        if isinstance(wg, bool) or not (wg == "row" or (isinstance(wg, int) and wg > 0)):
            raise ValueError(
                f"QuantConfig(weight_group={wg!r}): use 'row' or a positive int group size "
                "such as 64 or 128"
            )
        if isinstance(wg, int) and wg % 2 and self.weight_bits == 4:
            raise ValueError(
                f"QuantConfig(weight_group={wg}): 4-bit weights pack two per byte, so the "
                "group size must be even"
            )
        if self.act_granularity != "token":
            raise ValueError(
                f"QuantConfig(act_granularity={self.act_granularity!r}): only 'token' "
                "(dynamic min/max per token) is supported"
            )
        if self.act_clip is not None:
            lo, hi = self.act_clip
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(
                    f"QuantConfig(act_clip={self.act_clip!r}) must be None or finite (lo, hi) "
                    "with lo < hi"
                )
        rot = self.rotation
        if rot is not None and (isinstance(rot, bool) or not isinstance(rot, int) or rot < 2 or rot & (rot - 1)):
            raise ValueError(
                f"QuantConfig(rotation={rot!r}): use None (no rotation) or a power-of-two block "
                "size such as 64 or 128 that divides every quantized linear's input dimension"
            )
        self._check_act_block()
        bad = [r for r in self.roles if r not in ROLES]
        if bad:
            raise ValueError(f"QuantConfig(roles=...) has unknown roles {bad}; choose from {ROLES}")
        object.__setattr__(self, "roles", tuple(self.roles))

    def _check_act_block(self) -> None:
        blk = self.act_block
        if blk is None:
            return
        if isinstance(blk, bool) or not isinstance(blk, int) or blk < 2:
            raise ValueError(
                f"QuantConfig(act_block={blk!r}): use None (token-wise) or a block size such as "
                "128 that divides every quantized linear's input dimension K"
            )
        if self.act_bits == 16:
            raise ValueError(
                f"QuantConfig(act_block={blk}, act_bits=16): float activations have no scales; "
                "set act_bits=4 or 8, or act_block=None"
            )
        wg = self.weight_group
        if isinstance(wg, int) and wg % blk:
            raise ValueError(
                f"QuantConfig(weight_group={wg}, act_block={blk}): each activation block must lie "
                f"inside one weight group; use weight_group='row' or a multiple of {blk}"
            )

    @property
    def group_size(self) -> int | None:
        """The weight group size along K, or None for whole rows."""
        return None if self.weight_group == "row" else int(self.weight_group)

    @property
    def quantizes_activations(self) -> bool:
        return self.act_bits < 16

    @property
    def tag(self) -> str:
        """Short name such as ``W4A4-asym`` used in reports and plots."""
        return precision_tag(self.weight_bits, self.act_bits, self.symmetric, self.group_size, sep="-", rotation=self.rotation,
                             act_block=self.act_block)

    def with_(self, **changes) -> "QuantConfig":
        return replace(self, **changes)

    def __repr__(self) -> str:
        # Fields added after checkpoints began to record ``repr(config)`` (qfx.train.checkpoint's
        # fingerprint) are shown only when set, so a run saved before them still resumes.
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if not (f.name in _SHOWN_WHEN_SET and getattr(self, f.name) == f.default)]
        return f"QuantConfig({', '.join(parts)})"


def precision_tag(weight_bits: int, act_bits: int, symmetric: bool, group_size: int | None, sep: str = " ",
                  rotation: int | None = None, act_block: int | None = None) -> str:
    """``W4A4-asym-g64`` (sep="-") or ``W4A4 asym g64`` (``rot128`` appended for a rotated
    input, ``ablk128`` for block-scaled activations): the one spelling of a precision."""
    parts = [f"W{weight_bits}A{act_bits}"]
    if act_bits < 16:
        parts.append("sym" if symmetric else "asym")
    if group_size is not None:
        parts.append(f"g{group_size}")
    if rotation is not None:
        parts.append(f"rot{rotation}")
    if act_block is not None:
        parts.append(f"ablk{act_block}")
    return sep.join(parts)


#: accepted spellings of each mode (case-insensitive)
_MODE_SPELLINGS = {
    "int4": "int4", "w4a4": "int4", "i4": "int4",
    "int8": "int8", "w8a8": "int8", "i8": "int8",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}


def mode_of(config: QuantConfig) -> str:
    """The compile mode a trained config runs in: its weight width (``int4`` / ``int8``)."""
    return f"int{config.weight_bits}"


def parse_mode(mode: "str | None", trained: QuantConfig | None = None) -> str:
    """The one parser of ``compile(mode=...)``.

    Args:
        mode: ``"int4"`` / ``"int8"`` / ``"fp16"`` (also ``"INT4"``, ``"w4a4"``, ``"float16"``),
            or ``None``: inferred from ``trained`` (a QAT model's config), else ``"int4"``.
        trained: the config a QAT model was trained with, if any.

    Raises:
        ValueError: an unknown mode, naming the valid ones.

    Example::

        >>> parse_mode("W8A8"), parse_mode(None, QuantConfig(8, 8)), parse_mode(None)
        ('int8', 'int8', 'int4')
    """
    if mode is None:
        return mode_of(trained) if trained is not None else "int4"
    if not isinstance(mode, str) or mode.strip().lower() not in _MODE_SPELLINGS:
        raise ValueError(
            f"mode={mode!r} is not one of {MODES} (or None: inferred from a QAT model's trained config)"
        )
    return _MODE_SPELLINGS[mode.strip().lower()]


def config_for_mode(mode: str) -> QuantConfig | None:
    """The default config of a compile mode; None for ``fp16`` (no quantization)."""
    mode = parse_mode(mode)
    if mode == "int4":
        return QuantConfig(weight_bits=4, act_bits=4)
    if mode == "int8":
        return QuantConfig(weight_bits=8, act_bits=8)
    if mode == "fp16":
        return None
    raise ValueError(f"mode={mode!r} is not one of {MODES}")
