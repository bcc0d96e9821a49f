"""qfx demo: the packaged all-MiniLM-L6-v2 sentence encoder compiled to W8A8 and W4A4.

Prints what was compiled, one table (latency and quality vs fp32 per mode, and the peer each
qfx mode beats or loses to), what W4A4 post-training quantization loses and the one command
that recovers it (QAT), nearest neighbours as text, and with --report the full compile
report. Runs on the CPU (the cpu backend: oneDNN int8 GEMMs on AMX / VNNI, bit for bit the
exact reference) and on a GPU (CUTLASS integer kernels where built). The same as ``python -m qfx demo``.

    python examples/demo.py [--target cpu|sm_80|sm_86|sm_89|sm_90] [--repeat N] [--report] [--model-dir DIR]
"""
from __future__ import annotations

import argparse

from qfx.embeddings.demo import add_arguments, run_demo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args()
    return run_demo(target=args.target, model_dir=args.model_dir, repeat=args.repeat, report=args.report, threads=args.threads)


if __name__ == "__main__":
    raise SystemExit(main())
