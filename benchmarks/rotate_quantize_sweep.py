"""Kernel times of the rotated linears' input path (one GPU): quantize alone, rotation kernel + quantize
kernel, the fused rotate + quantize kernel (backends/triton/rotation_quant.py), and for LayerNorm readers
add + LayerNorm + quantize (unrotated), its rotated four-kernel form and the fused kernel.

    python benchmarks/rotate_quantize_sweep.py

Microseconds per call, 200 calls replayed from a CUDA graph; checks that the fused kernels' codes equal
the two-kernel path's before timing them. Needs the native library (the quantize kernels) and Triton.
"""
from __future__ import annotations

import torch

import qfx.backends.triton.rotation_quant as rqk
from qfx import numerics
from qfx.backends.cutlass.launch import AddLayerNormQuantizeLauncher, QuantizeLauncher
from qfx.backends.triton.rotation import rotate_triton


def bench(fn, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(iters // 20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1000


def main() -> None:
    rqk.SMALL_VALUES = 1 << 62  # time the fused kernel at every size
    print("| M x K | quantize | rotate + quantize (2 kernels) | fused rotate + quantize |")
    print("|---|---|---|---|")
    for m, k in [(128, 384), (4096, 384), (16384, 384), (4096, 768), (16384, 768), (16384, 1536), (16384, 3072)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        s = numerics.rotation_signs(k).cuda()
        quant = QuantizeLauncher(4, False, None)
        fused = rqk.RotateQuantizeLauncher(s, 128, 4, False, None)
        assert all(torch.equal(a, b) for a, b in zip(fused(x), quant(rotate_triton(x, s, 128))))
        times = [bench(lambda: quant(x)), bench(lambda: quant(rotate_triton(x, s, 128))), bench(lambda: fused(x))]
        print(f"| {m} x {k} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)
    print()
    print("| M x K | add + LayerNorm + quantize (unrotated, CUDA) | add, LayerNorm, rotate, quantize (4 kernels) | fused (Triton) |")
    print("|---|---|---|---|")
    for m, k in [(128, 384), (16384, 384), (128, 768), (16384, 768)]:
        a, b = torch.randn(m, k, device="cuda", dtype=torch.float16), torch.randn(m, k, device="cuda", dtype=torch.float16)
        s = numerics.rotation_signs(k).cuda()
        w = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
        bias = torch.randn(k, device="cuda", dtype=torch.float16) * 0.1
        quant = QuantizeLauncher(4, False, None)
        plain = AddLayerNormQuantizeLauncher(1e-12, 4, False, None)
        fused = rqk.AddLayerNormRotateQuantizeLauncher(1e-12, s, 128, 4, False, None)
        apart = lambda: quant(rotate_triton(torch.nn.functional.layer_norm(a + b, (k,), w, bias, 1e-12), s, 128))  # noqa: E731
        print(f"| {m} x {k} | {bench(lambda: plain(a, b, w, bias)):.1f} | {bench(apart):.1f} | "
              f"{bench(lambda: fused(a, b, w, bias)):.1f} |", flush=True)


if __name__ == "__main__":
    main()
