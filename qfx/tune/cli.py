"""``python -m qfx plan``: print the per-part plan of a model for a target, without a GPU.

    python -m qfx plan --model bert-base --target sm_86 --batch 32 --seq 128
    python -m qfx plan --model path/to/config.json --target sm_90 --buckets 1x128,32x384 --mode int8
    python -m qfx plan --model bert-large --target sm_86 --batch 32 --seq 384 --fused-quantize --fused-epilogue
    python -m qfx plan --model bert-base --target sm_90 --batch 128 --seq 128 --mode int8 --act-block 128

``--model``: ``bert-base``, ``bert-large``, ``minilm`` or a HF ``config.json``. Without a GPU of
the target's kernel family the plan is modelled (:mod:`qfx.tune.cost_model`) and says so;
``--measure`` times the candidates on the GPU present instead (it must be of the target's family).
``--act-block B``: the model was trained with block-scaled activations (``QuantConfig(act_block=B)``);
its integer parts are priced as the block kernels, always modelled (the tuner times token-wise kernels).

Example::

    >>> from qfx.tune.cli import plan_main
    >>> plan_main(["--model", "bert-base", "--target", "sm_86", "--batch", "32", "--seq", "128"])
    0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qfx.targets import get_target
from qfx.tune.autotune import Scenario, autotune
from qfx.tune.cost_model import MODEL_SHAPES, ModelShape
from qfx.tune.evidence import trust_statement
from qfx.tune.parts import check_act_block
from qfx.tune.plan_report import render_plan

__all__ = ["plan_main", "load_model_shape"]


def load_model_shape(spec: str) -> ModelShape:
    """A named model (``bert-base``, ``bert-large``, ``minilm``) or a HF ``config.json`` path."""
    if spec in MODEL_SHAPES:
        return MODEL_SHAPES[spec]
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--model {spec!r}: not one of {sorted(MODEL_SHAPES)} and no such config file")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {spec!r}: cannot read it as a JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--model {spec!r}: a HF config.json holds a JSON object")
    return ModelShape.from_config(cfg, name=path.stem if path.stem != "config" else path.parent.name or "config")


def _buckets(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            b, s = item.lower().split("x")
            out.append((int(b), int(s)))
        except ValueError:
            raise ValueError(f"--buckets {text!r}: write batch x seq pairs like 1x128,32x384") from None
    return out


def _act_block(text: str | None, shape: ModelShape) -> int | None:
    """``--act-block``: a whole number >= 2 dividing every K of the model (QuantConfig's rule)."""
    if text is None:
        return None
    try:
        block = int(text)
    except ValueError:
        raise ValueError(f"--act-block {text!r}: give the block size as a whole number dividing every K of the "
                         "model, e.g. --act-block 128; leave it out for token-wise activations") from None
    check_act_block(block, [k for _, _, k in shape.parts()], where="--act-block")
    return block


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qfx plan", description="Per-layer-part precision/kernel plan for a target.",
        epilog="The scenario is required: --batch B --seq S (one shape) or --buckets 1x128,32x384 (several). "
               "Without a GPU of the target's family the times are modelled; the plan says how far they can be "
               "trusted (qfx.tune.evidence.trust_statement).")
    p.add_argument("--model", required=True, help="bert-base | bert-large | minilm | path to a HF config.json")
    p.add_argument("--target", required=True, help="sm_80 | sm_86 | sm_89 | sm_90 (also sm86, 86)")
    p.add_argument("--gpu", default=None, help="another product of the target, e.g. 3090, A10, 4090")
    p.add_argument("--batch", type=int, default=None, help="batch size; required with --seq unless --buckets is given")
    p.add_argument("--seq", type=int, default=None, help="sequence length; required with --batch unless --buckets is given")
    p.add_argument("--buckets", default=None, help="several scenarios instead of --batch/--seq: 1x128,32x384")
    p.add_argument("--mode", default="int4", choices=("int4", "int8"), help="the precision the model was trained for")
    p.add_argument("--measure", action="store_true", help="time on the GPU present (must be of the target's family)")
    p.add_argument("--act-block", default=None, metavar="B",
                   help="block-scaled activations, one scale per token per B input channels (QuantConfig(act_block=B)); "
                        "B divides every K, e.g. 128; modelled only")
    p.add_argument("--fused-quantize", action="store_true", help="model the quantize folded into LayerNorm/GELU (the paper)")
    p.add_argument("--fused-epilogue", action="store_true", help="model the dequant fused into every integer GEMM")
    p.add_argument("--per-layer", action="store_true", help="one row per layer instead of merging equal layers")
    return p


def plan_main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m qfx plan``; returns the process exit code (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        shape = load_model_shape(args.model)
        target = get_target(args.target, gpu=args.gpu)
        if args.buckets is None and (args.batch is None or args.seq is None):
            raise ValueError("give the scenario: --batch B --seq S (e.g. --batch 32 --seq 128), or --buckets 1x128,32x384")
        if args.buckets is not None:
            scenario = Scenario.of(buckets=_buckets(args.buckets)) if args.batch is None and args.seq is None else Scenario.of(
                batch=args.batch, seq=args.seq, buckets=_buckets(args.buckets))
        else:
            scenario = Scenario.of(batch=args.batch, seq=args.seq)
        act_block = _act_block(args.act_block, shape)
        if act_block is not None and args.measure:
            raise ValueError(f"--measure with --act-block {act_block}: the tuner times token-wise kernels only; "
                             "drop --measure for the modelled block-scaled plan")
        plan = autotune(shape, target, scenario, args.mode, measure=True if args.measure else False,
                        fused_quantize=args.fused_quantize, fused_epilogue=True if args.fused_epilogue else None,
                        act_block=act_block)
    except ValueError as e:
        print(f"qfx plan: {e}", file=sys.stderr)
        return 2
    print(render_plan(plan, per_layer=args.per_layer))
    if plan.source == "modelled" and "trust:" not in plan.origin:  # once the plan's origin carries it, not twice
        print(f"trust: {trust_statement(target)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(plan_main())
