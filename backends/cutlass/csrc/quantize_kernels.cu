// Token-wise dynamic activation quantization: each kernel reduces a row's max|x| (or min and
// max) and writes int8 codes, the scale and the offset, reproducing qfx/numerics.py bit for bit
// (TokenQuant below), so the codes equal the CPU reference's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "qfx_abi.h"
#include "qfx_epilogue.cuh"
#include "qfx_launch.cuh"

namespace {

constexpr int kThreads = 256;
constexpr float kEps = 1e-8f;  // qfx.numerics.EPS

template <class T> __device__ float to_f32(T x);
template <> __device__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ float to_f32<float>(float x) { return x; }
template <class T> __device__ T from_f32(float x);
template <> __device__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ float from_f32<float>(float x) { return x; }

// The value the quantizer sees: gelu(x) in T (computed in fp32 with torch's expression, then
// rounded to T, as torch.nn.functional.gelu on a T tensor), then the clip. With gelu the codes
// equal those of a separate GELU kernel followed by quantize, without writing gelu(x) out.
template <class T>
__device__ __forceinline__ float quantizer_input(T x, bool gelu, int has_clip, float clip_lo, float clip_hi) {
  float f = to_f32(x);
  if (gelu) f = to_f32(from_f32<T>(qfx_gelu(f)));
  return has_clip ? fminf(fmaxf(f, clip_lo), clip_hi) : f;
}

// The token's quantization parameters and codes, as qfx/numerics.py computes them: every float
// operation an explicit round-to-nearest intrinsic in the module's order (no FMA contraction, a
// true division, rintf = round half to even). Shared by every kernel that emits codes, so they
// agree with each other and with the CPU reference bit for bit.
struct TokenQuant {
  float scale, inv_scale, offset, zero, half_range, code_lo, code_hi;
  bool symmetric;

  // lo, hi: the row's min and max (symmetric: hi is max|x|, lo unused)
  __device__ TokenQuant(float lo, float hi, int bits, int symmetric_) : symmetric(symmetric_ != 0) {
    half_range = static_cast<float>(1 << (bits - 1));
    code_lo = -half_range;
    code_hi = half_range - 1.f;
    if (symmetric) {  // S = max(absmax, eps) / (2^(b-1) - 1)
      scale = __fdiv_rn(fmaxf(hi, kEps), code_hi);
      offset = 0.f;
      zero = 0.f;
    } else {  // S = max(hi - lo, eps) / (2^b - 1); c = lo + 2^(b-1) S; z = c - 2^(b-1) S
      scale = __fdiv_rn(fmaxf(__fsub_rn(hi, lo), kEps), static_cast<float>((1 << bits) - 1));
      offset = __fadd_rn(lo, __fmul_rn(half_range, scale));
      zero = __fsub_rn(offset, __fmul_rn(half_range, scale));
    }
    inv_scale = __frcp_rn(scale);
  }

  // rintf(__fdiv_rn(num, scale)), bit for bit, mostly without the division (an IEEE division is
  // ~10 instructions a code; measured: 9 % fewer instructions in the GELU + quantize kernel,
  // benchmarks/RESULTS.md). p = num * RN(1/scale) carries two roundings
  // of 2^-24 relative, so for |p| <= 1024 it lies within 2^-13 of num / scale, and the correctly
  // rounded quotient within 2^-14: where p is farther than 2^-10 from every half-integer, all
  // three lie between the same two half-integers and round to the same integer. The rest (~0.2 %
  // of values; |p| > 1024; inf, NaN) take the exact division.
  __device__ __forceinline__ float rounded_quotient(float num) const {
    const float p = __fmul_rn(num, inv_scale);
    const float r = rintf(p);
    if (fabsf(p) <= 1024.f && fabsf(__fsub_rn(p, r)) <= 0.5f - 0x1p-10f) return r;
    return rintf(__fdiv_rn(num, scale));
  }

  __device__ int8_t code(float v) const {
    const float c = symmetric ? rounded_quotient(v) : __fsub_rn(rounded_quotient(__fsub_rn(v, zero)), half_range);
    return static_cast<int8_t>(fminf(fmaxf(c, code_lo), code_hi));
  }
};

// Widen a row's running range by one quantizer input f: symmetric codes need only max|f| (in
// hi; lo unused), asymmetric ones min and max. Every kernel that emits codes reduces this way.
__device__ __forceinline__ void widen_range(float f, int symmetric, float& lo, float& hi) {
  if (symmetric) {
    hi = fmaxf(hi, fabsf(f));
  } else {
    lo = fminf(lo, f);
    hi = fmaxf(hi, f);
  }
}

// The range over a warp's 32 lanes, in every lane (butterfly shuffles; min and max are exact in
// any order, so the result does not depend on it).
__device__ __forceinline__ void warp_min_max(float& lo, float& hi) {
  for (int off = 16; off > 0; off >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
}

struct MinMax {
  float lo, hi;
};

__device__ MinMax block_min_max(float lo, float hi) {
  __shared__ float s_lo[kThreads / 32], s_hi[kThreads / 32];
  warp_min_max(lo, hi);
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
                                     int has_clip, float clip_lo, float clip_hi, int gelu,
                                     int8_t* __restrict__ q, float* __restrict__ scale,
                                     float* __restrict__ offset) {
  pdl_wait();  // before any global access (qfx_launch.cuh)
  const long long row = blockIdx.x;
  T const* xr = x + row * k;
  int8_t* qr = q + row * k;
  auto load = [&](long long i) { return quantizer_input(xr[i], gelu != 0, has_clip, clip_lo, clip_hi); };
  float lo = FLT_MAX, hi = -FLT_MAX;
  for (long long i = threadIdx.x; i < k; i += kThreads) {
    widen_range(load(i), symmetric, lo, hi);
  }
  const MinMax mm = block_min_max(lo, hi);
  const TokenQuant tq(mm.lo, mm.hi, bits, symmetric);
  for (long long i = threadIdx.x; i < k; i += kThreads) qr[i] = tq.code(load(i));
  if (threadIdx.x == 0) {
    scale[row] = tq.scale;
    offset[row] = tq.offset;
  }
}


// ---------------------------------------------------------------------------------------------
// Register-held variant for the rows BERT-class models have (K a multiple of one 16-byte vector,
// K <= 128 lanes x 8 vectors: 8192 fp16 values): a warp per row, or 4 warps per long row. Each lane loads its vectors once with 16-byte loads, keeps them
// in registers for both passes, reduces with warp shuffles only (no shared memory, no block
// barrier) and stores 8 or 4 codes at a time. The arithmetic per element is the block kernel's,
// operation for operation, and min/max reductions are exact in any order: the codes, scales and
// offsets are bit-identical to quantize_rows_kernel's (tested against the CPU reference).
constexpr int kWarpRowsPerBlock = 4;

// Write a register-held row's codes (a lane's vector j holds elements (lane + kLanes * j) * kN
// onwards: one 8- or 4-byte store of kN codes) and, from lane 0, the row's scale and offset.
template <int kN, int kMaxVecs, int kLanes>
__device__ __forceinline__ void store_row_codes(TokenQuant const& tq, float const (&v)[kMaxVecs][kN], int lane,
                                                int nvec, long long row, int k, int8_t* __restrict__ q,
                                                float* __restrict__ scale, float* __restrict__ offset) {
  int8_t* qr = q + row * k;
#pragma unroll
  for (int j = 0; j < kMaxVecs; ++j) {
    const int idx = lane + kLanes * j;
    if (idx < nvec) {
      int8_t codes[kN];
#pragma unroll
      for (int t = 0; t < kN; ++t) codes[t] = tq.code(v[j][t]);
      if constexpr (kN == 8) {
        *reinterpret_cast<uint2*>(qr + idx * kN) = *reinterpret_cast<uint2 const*>(codes);
      } else {
        *reinterpret_cast<unsigned*>(qr + idx * kN) = *reinterpret_cast<unsigned const*>(codes);
      }
    }
  }
  if (lane == 0) {
    scale[row] = tq.scale;
    offset[row] = tq.offset;
  }
}

template <class T> struct Vec;  // one 16-byte vector of T
template <> struct Vec<__half> { static constexpr int n = 8; using raw = uint4; };
template <> struct Vec<__nv_bfloat16> { static constexpr int n = 8; using raw = uint4; };
template <> struct Vec<float> { static constexpr int n = 4; using raw = uint4; };

template <class T, int kMaxVecs, int kWarps, bool kGelu>
__global__ void quantize_rows_warp_kernel(T const* __restrict__ x, long long rows, int k, int bits,
                                          int symmetric, int has_clip, float clip_lo,
                                          float clip_hi, int8_t* __restrict__ q,
                                          float* __restrict__ scale, float* __restrict__ offset) {
  pdl_wait();  // before any global access (qfx_launch.cuh)
  // kWarps == 1: each warp of the block owns a row; kWarps > 1: the block's warps share one
  // row (long rows: fewer registers per lane, more loads in flight per row).
  constexpr int kN = Vec<T>::n;
  constexpr int kLanes = 32 * kWarps;
  const int lane = kWarps == 1 ? threadIdx.x % 32 : threadIdx.x;
  const long long row = kWarps == 1
      ? static_cast<long long>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32
      : static_cast<long long>(blockIdx.x);
  if (row >= rows) return;
  const int nvec = k / kN;
  auto const* xr = reinterpret_cast<typename Vec<T>::raw const*>(x + row * k);
  float v[kMaxVecs][kN];
  float lo = FLT_MAX, hi = -FLT_MAX;
#pragma unroll
  for (int j = 0; j < kMaxVecs; ++j) {
    const int idx = lane + kLanes * j;
    if (idx < nvec) {
      const typename Vec<T>::raw raw = xr[idx];
      T const* e = reinterpret_cast<T const*>(&raw);
#pragma unroll
      for (int t = 0; t < kN; ++t) {
        v[j][t] = quantizer_input(e[t], kGelu, has_clip, clip_lo, clip_hi);
        widen_range(v[j][t], symmetric, lo, hi);
      }
    }
  }
  warp_min_max(lo, hi);
  if constexpr (kWarps > 1) {  // min/max are exact in any order: the result does not change
    __shared__ float s_lo[kWarps], s_hi[kWarps];
    if (threadIdx.x % 32 == 0) {
      s_lo[threadIdx.x / 32] = lo;
      s_hi[threadIdx.x / 32] = hi;
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      lo = fminf(lo, s_lo[w]);
      hi = fmaxf(hi, s_hi[w]);
    }
  }
  store_row_codes<kN, kMaxVecs, kLanes>(TokenQuant(lo, hi, bits, symmetric), v, lane, nvec, row, k, q, scale, offset);
}

// Launch the warp kernel with the fewest register vectors that hold a row; false if the row
// does not fit it (K not a multiple of the vector, or too long).
template <class T, bool kGelu>
bool launch_warp_rows(T const* x, long long rows, long long k, int bits, int symmetric, int has_clip,
                      float clip_lo, float clip_hi, int8_t* q, float* scale, float* offset,
                      cudaStream_t s) {
  constexpr int kN = Vec<T>::n;
  if (k % kN != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(q) % 8 != 0) {
    return false;
  }
  const long long vecs = k / kN;
  const int ki = static_cast<int>(k);
  // Rows of up to 4 vectors a lane run a warp per row; longer rows (BERT's FFN-out input,
  // K = 3072 / 4096) run 4 warps per row, keeping registers per lane (and so occupancy) low.
  // W warps per row (a block of 4 rows when W == 1), V vectors a lane: the first that holds the row.
#define QFX_WARP_CASE(W, V)                                                                       \
  if (vecs <= 32LL * (W) * (V)) {                                                                 \
    const unsigned blocks = (W) == 1 ? (rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock : rows; \
    launch_pdl(quantize_rows_warp_kernel<T, V, W, kGelu>, dim3(blocks),                           \
               dim3(32 * ((W) == 1 ? kWarpRowsPerBlock : (W))), 0, s, x, rows, ki, bits, symmetric, \
               has_clip, clip_lo, clip_hi, q, scale, offset);                                      \
    return true;                                                                                  \
  }
  QFX_WARP_CASE(1, 1)
  QFX_WARP_CASE(1, 2)
  QFX_WARP_CASE(1, 3)
  QFX_WARP_CASE(1, 4)
  if (rows > 0x7fffffffLL) return false;
  QFX_WARP_CASE(4, 2)
  QFX_WARP_CASE(4, 3)
  QFX_WARP_CASE(4, 4)
  QFX_WARP_CASE(4, 6)
  QFX_WARP_CASE(4, 8)
#undef QFX_WARP_CASE
  return false;
}

// The register-held kernels where a row fits them, else the block kernel.
template <class T>
void quantize_rows_any(T const* x, long long rows, long long k, int bits, int symmetric, int has_clip,
                       float clip_lo, float clip_hi, int gelu, int8_t* q, float* scale, float* offset,
                       cudaStream_t s) {
  const bool warp = gelu ? launch_warp_rows<T, true>(x, rows, k, bits, symmetric, has_clip, clip_lo, clip_hi, q, scale, offset, s)
                         : launch_warp_rows<T, false>(x, rows, k, bits, symmetric, has_clip, clip_lo, clip_hi, q, scale, offset, s);
  if (!warp) {
    launch_pdl(quantize_rows_kernel<T>, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, s,
               x, k, bits, symmetric, has_clip, clip_lo, clip_hi, gelu, q, scale, offset);
  }
}
}  // namespace

// x: [rows, k] of dtype x_dtype (QfxDtype), row-major; q: int8 [rows, k]; scale, offset: f32
// [rows] (offset is written as 0 for symmetric). bits: 4 or 8. gelu: quantize gelu(x) (exact
// erf, rounded to x's dtype first, as torch's gelu on x), the clip after it.
QFX_API int qfx_quantize_rows(void const* x, int x_dtype, long long rows, long long k, int bits,
                              int symmetric, int has_clip, float clip_lo, float clip_hi, int gelu,
                              void* q, float* scale, float* offset, void* stream) {
  if ((bits != 4 && bits != 8) || rows < 0 || k <= 0) return QFX_BAD_ARGUMENT;
  if (rows == 0) return QFX_OK;
  if (rows > 0x7fffffffLL) return QFX_BAD_ARGUMENT;
  auto s = static_cast<cudaStream_t>(stream);
  auto qp = static_cast<int8_t*>(q);
  switch (x_dtype) {
    case QFX_F16:
      quantize_rows_any(static_cast<__half const*>(x), rows, k, bits, symmetric, has_clip, clip_lo, clip_hi, gelu, qp, scale, offset, s);
      break;
    case QFX_BF16:
      quantize_rows_any(static_cast<__nv_bfloat16 const*>(x), rows, k, bits, symmetric, has_clip, clip_lo, clip_hi, gelu, qp, scale, offset, s);
      break;
    case QFX_F32:
      quantize_rows_any(static_cast<float const*>(x), rows, k, bits, symmetric, has_clip, clip_lo, clip_hi, gelu, qp, scale, offset, s);
      break;
    default:
      return QFX_BAD_ARGUMENT;
  }
  return cudaPeekAtLastError() == cudaSuccess ? QFX_OK : QFX_LAUNCH_FAILED;
}

// ---------------------------------------------------------------------------------------------
// Residual add + LayerNorm + token-wise quantize in one pass (the float parts in fp16 / bf16).
//
//   s = round_T(a + b)                      (b may be null: s = a)        -- torch's add
//   y = round_T((s - mean) * rstd * gamma + beta),  mean, var over the row in fp32
//   q, scale, offset = quantize(y)          (the quantize kernels' arithmetic, exactly)
//
// One warp per row, the row held in registers: a and b are read once, y and the codes written
// once (7 bytes per element instead of 13 for add, LayerNorm and quantize as three kernels).
// The codes are bit-identical to quantizing this kernel's own y; y itself equals torch's
// LayerNorm up to fp32 rounding of the mean and variance (another summation order).
namespace {

template <class T, int kMaxVecs>
__global__ void add_ln_quantize_kernel(T const* __restrict__ a, T const* __restrict__ b,
                                       T const* __restrict__ gamma, T const* __restrict__ beta,
                                       float eps, long long rows, int k, int bits, int symmetric,
                                       int has_clip, float clip_lo, float clip_hi,
                                       T* __restrict__ y, int8_t* __restrict__ q,
                                       float* __restrict__ scale, float* __restrict__ offset) {
  pdl_wait();  // before any global access (qfx_launch.cuh)
  constexpr int kN = Vec<T>::n;
  using Raw = typename Vec<T>::raw;
  const int lane = threadIdx.x % 32;
  const long long row = static_cast<long long>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int nvec = k / kN;
  auto const* ar = reinterpret_cast<Raw const*>(a + row * k);
  auto const* br = b ? reinterpret_cast<Raw const*>(b + row * k) : nullptr;
  float v[kMaxVecs][kN];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxVecs; ++j) {
    const int idx = lane + 32 * j;
    if (idx < nvec) {
      const Raw ra = ar[idx];
      T const* ea = reinterpret_cast<T const*>(&ra);
      Raw rb;
      T const* eb = reinterpret_cast<T const*>(&rb);
      if (br) rb = br[idx];
#pragma unroll
      for (int t = 0; t < kN; ++t) {
        float s = to_f32(ea[t]);
        if (br) s = to_f32(from_f32<T>(__fadd_rn(s, to_f32(eb[t]))));
        v[j][t] = s;
        sum += s;
      }
    }
  }
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float mean = sum / static_cast<float>(k);
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxVecs; ++j) {
    if (lane + 32 * j < nvec) {
#pragma unroll
      for (int t = 0; t < kN; ++t) {
        const float d = v[j][t] - mean;
        sq += d * d;
      }
    }
  }
  for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
  const float rstd = rsqrtf(sq / static_cast<float>(k) + eps);
  auto const* gr = reinterpret_cast<Raw const*>(gamma);
  auto const* btr = reinterpret_cast<Raw const*>(beta);
  auto* yr = reinterpret_cast<Raw*>(y + row * k);
  float lo = FLT_MAX, hi = -FLT_MAX;
#pragma unroll
  for (int j = 0; j < kMaxVecs; ++j) {
    const int idx = lane + 32 * j;
    if (idx < nvec) {
      const Raw rg = gr[idx], rbt = btr[idx];
      T const* eg = reinterpret_cast<T const*>(&rg);
      T const* ebt = reinterpret_cast<T const*>(&rbt);
      Raw out;
      T* eo = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int t = 0; t < kN; ++t) {
        const T yt = from_f32<T>((v[j][t] - mean) * rstd * to_f32(eg[t]) + to_f32(ebt[t]));
        eo[t] = yt;
        float f = to_f32(yt);  // quantize the values the model carries on, as the unfused graph does
        f = has_clip ? fminf(fmaxf(f, clip_lo), clip_hi) : f;
        v[j][t] = f;
        widen_range(f, symmetric, lo, hi);
      }
      yr[idx] = out;
    }
  }
  warp_min_max(lo, hi);
  store_row_codes<kN, kMaxVecs, 32>(TokenQuant(lo, hi, bits, symmetric), v, lane, nvec, row, k, q, scale, offset);
}

template <class T>
int launch_add_ln_quantize(T const* a, T const* b, T const* gamma, T const* beta, float eps,
                           long long rows, long long k, int bits, int symmetric, int has_clip,
                           float clip_lo, float clip_hi, T* y, int8_t* q, float* scale,
                           float* offset, cudaStream_t s) {
  constexpr int kN = Vec<T>::n;
  for (void const* p : {static_cast<void const*>(a), static_cast<void const*>(b),
                        static_cast<void const*>(gamma), static_cast<void const*>(beta),
                        static_cast<void const*>(y)}) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return QFX_BAD_ARGUMENT;
  }
  if (k % kN != 0 || k / kN > 32 * 4 || reinterpret_cast<uintptr_t>(q) % 8 != 0) return QFX_BAD_ARGUMENT;
  const long long vecs = k / kN;
  const dim3 grid(static_cast<unsigned>((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock));
  const dim3 block(32 * kWarpRowsPerBlock);
  const int ki = static_cast<int>(k);
#define QFX_LN_CASE(V)                                                                             \
  if (vecs <= 32 * V) {                                                                            \
    launch_pdl(add_ln_quantize_kernel<T, V>, grid, block, 0, s, a, b, gamma, beta, eps, rows, ki,  \
               bits, symmetric, has_clip, clip_lo, clip_hi, y, q, scale, offset);                  \
    return cudaPeekAtLastError() == cudaSuccess ? QFX_OK : QFX_LAUNCH_FAILED;                      \
  }
  QFX_LN_CASE(1)
  QFX_LN_CASE(2)
  QFX_LN_CASE(3)
  QFX_LN_CASE(4)
#undef QFX_LN_CASE
  return QFX_BAD_ARGUMENT;
}

}  // namespace

// a, b (b may be null), y: [rows, k] of dtype x_dtype (fp16 or bf16), row-major; gamma, beta: [k];
// q: int8 [rows, k]; scale, offset: f32 [rows]. k a multiple of 8, at most 1024 (else
// QFX_BAD_ARGUMENT: the caller keeps the unfused ops).
QFX_API int qfx_add_layer_norm_quantize(void const* a, void const* b, void const* gamma,
                                        void const* beta, int x_dtype, long long rows, long long k,
                                        float eps, int bits, int symmetric, int has_clip,
                                        float clip_lo, float clip_hi, void* y, void* q,
                                        float* scale, float* offset, void* stream) {
  if ((bits != 4 && bits != 8) || rows < 0 || k <= 0) return QFX_BAD_ARGUMENT;
  if (rows == 0) return QFX_OK;
  auto s = static_cast<cudaStream_t>(stream);
  auto qp = static_cast<int8_t*>(q);
  switch (x_dtype) {
    case QFX_F16:
      return launch_add_ln_quantize(static_cast<__half const*>(a), static_cast<__half const*>(b),
                                    static_cast<__half const*>(gamma), static_cast<__half const*>(beta),
                                    eps, rows, k, bits, symmetric, has_clip, clip_lo, clip_hi,
                                    static_cast<__half*>(y), qp, scale, offset, s);
    case QFX_BF16:
      return launch_add_ln_quantize(static_cast<__nv_bfloat16 const*>(a), static_cast<__nv_bfloat16 const*>(b),
                                    static_cast<__nv_bfloat16 const*>(gamma),
                                    static_cast<__nv_bfloat16 const*>(beta), eps, rows, k, bits,
                                    symmetric, has_clip, clip_lo, clip_hi,
                                    static_cast<__nv_bfloat16*>(y), qp, scale, offset, s);
    default:
      return QFX_BAD_ARGUMENT;
  }
}
