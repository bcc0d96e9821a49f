// Scalar pieces shared by the fused (sm90_gemm.cuh) and unfused (support_kernels.cu) dequant
// epilogues. Their fp32 order is qfx.numerics.int_linear_reference's (EPILOGUES.md).
#pragma once
#include <cuda_runtime.h>

// Exact-erf GELU written as torch's CUDA kernel writes it, x*0.5*(1+erf(x*sqrt(1/2))): this
// expression reproduced torch.nn.functional.gelu bit for bit on all 2.7e8 fp32 inputs probed
// on the H100 (nvcc 13.0, torch 2.11); a normcdf-based form differed in 45% of them.
__device__ __forceinline__ float qfx_gelu(float x) {
  constexpr float kInvSqrt2 = 0.70710678118654752440f;
  return x * 0.5f * (1.f + erff(x * kInvSqrt2));
}
