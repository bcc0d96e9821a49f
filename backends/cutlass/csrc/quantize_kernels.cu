// Token-wise dynamic activation quantization in one pass over the activations: one block per
// row reads the row, reduces max|x| (or min and max), and writes int8 codes, the scale and the
// offset. It reproduces qfx/numerics.py bit for bit, so the codes equal the CPU reference's:
// every float operation is an explicit round-to-nearest intrinsic in the module's order (no
// FMA contraction, a true division, rintf = round half to even).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>

#include "qfx_abi.h"

namespace {

constexpr int kThreads = 256;
constexpr float kEps = 1e-8f;  // qfx.numerics.EPS

template <class T> __device__ float to_f32(T x);
template <> __device__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ float to_f32<float>(float x) { return x; }

struct MinMax {
  float lo, hi;
};

__device__ MinMax block_min_max(float lo, float hi) {
  __shared__ float s_lo[kThreads / 32], s_hi[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  lo = s_lo[0];
  hi = s_hi[0];
  for (int w = 1; w < kThreads / 32; ++w) {
    lo = fminf(lo, s_lo[w]);
    hi = fmaxf(hi, s_hi[w]);
  }
  return {lo, hi};
}

template <class T>
__global__ void quantize_rows_kernel(T const* __restrict__ x, long long k, int bits, int symmetric,
                                     int has_clip, float clip_lo, float clip_hi,
                                     int8_t* __restrict__ q, float* __restrict__ scale,
                                     float* __restrict__ offset) {
  const long long row = blockIdx.x;
  T const* xr = x + row * k;
  int8_t* qr = q + row * k;
  auto load = [&](long long i) {
    float v = to_f32(xr[i]);
    return has_clip ? fminf(fmaxf(v, clip_lo), clip_hi) : v;
  };
  float lo = FLT_MAX, hi = -FLT_MAX;
  for (long long i = threadIdx.x; i < k; i += kThreads) {
    const float v = load(i);
    if (symmetric) {
      hi = fmaxf(hi, fabsf(v));
    } else {
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  }
  const MinMax mm = block_min_max(lo, hi);
  const float half_range = static_cast<float>(1 << (bits - 1));
  const float code_lo = -half_range, code_hi = half_range - 1.f;
  float s, c, zero;
  if (symmetric) {  // S = max(absmax, eps) / (2^(b-1) - 1)
    s = __fdiv_rn(fmaxf(mm.hi, kEps), code_hi);
    c = 0.f;
    zero = 0.f;
  } else {  // S = max(hi - lo, eps) / (2^b - 1); c = lo + 2^(b-1) S; z = c - 2^(b-1) S
    s = __fdiv_rn(fmaxf(__fsub_rn(mm.hi, mm.lo), kEps), static_cast<float>((1 << bits) - 1));
    c = __fadd_rn(mm.lo, __fmul_rn(half_range, s));
    zero = __fsub_rn(c, __fmul_rn(half_range, s));
  }
  for (long long i = threadIdx.x; i < k; i += kThreads) {
    const float v = load(i);
    float code = symmetric ? rintf(__fdiv_rn(v, s))
                           : __fsub_rn(rintf(__fdiv_rn(__fsub_rn(v, zero), s)), half_range);
    code = fminf(fmaxf(code, code_lo), code_hi);
    qr[i] = static_cast<int8_t>(code);
  }
  if (threadIdx.x == 0) {
    scale[row] = s;
    offset[row] = c;
  }
}

}  // namespace

// x: [rows, k] of dtype x_dtype (QfxDtype), row-major; q: int8 [rows, k]; scale, offset: f32
// [rows] (offset is written as 0 for symmetric). bits: 4 or 8.
QFX_API int qfx_quantize_rows(void const* x, int x_dtype, long long rows, long long k, int bits,
                              int symmetric, int has_clip, float clip_lo, float clip_hi, void* q,
                              float* scale, float* offset, void* stream) {
  if ((bits != 4 && bits != 8) || rows < 0 || k <= 0) return QFX_BAD_ARGUMENT;
  if (rows == 0) return QFX_OK;
  if (rows > 0x7fffffffLL) return QFX_BAD_ARGUMENT;
  auto s = static_cast<cudaStream_t>(stream);
  auto qp = static_cast<int8_t*>(q);
  const dim3 grid(static_cast<unsigned>(rows));
  switch (x_dtype) {
    case QFX_F16:
      quantize_rows_kernel<__half><<<grid, kThreads, 0, s>>>(static_cast<__half const*>(x), k, bits,
          symmetric, has_clip, clip_lo, clip_hi, qp, scale, offset);
      break;
    case QFX_BF16:
      quantize_rows_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(
          static_cast<__nv_bfloat16 const*>(x), k, bits, symmetric, has_clip, clip_lo, clip_hi, qp,
          scale, offset);
      break;
    case QFX_F32:
      quantize_rows_kernel<float><<<grid, kThreads, 0, s>>>(static_cast<float const*>(x), k, bits,
          symmetric, has_clip, clip_lo, clip_hi, qp, scale, offset);
      break;
    default:
      return QFX_BAD_ARGUMENT;
  }
  return cudaPeekAtLastError() == cudaSuccess ? QFX_OK : QFX_LAUNCH_FAILED;
}
