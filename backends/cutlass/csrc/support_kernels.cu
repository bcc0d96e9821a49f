// Architecture-independent pieces of the library: the unfused dequant epilogue (used after the
// sm_80/86/89 int32 GEMMs, and on sm_90 for bf16/fp32 outputs), the int4 -> int8 weight
// unpacking that lets Hopper's INT8 tensor cores run int4 codes, and the ABI queries.
// The maths is the one in EPILOGUES.md, in the same fp32 operation order as the fused sm_90 EVT.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "qfx_abi.h"
#include "qfx_epilogue.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // N % 8 == 0 is required by the GEMMs, so 4-wide rows never straddle

template <class T> __device__ T to_out(float x);
template <> __device__ __half to_out<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __nv_bfloat16 to_out<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ float to_out<float>(float x) { return x; }

template <class Out>
__global__ void dequant_kernel(QfxGemmArgs p) {
  auto acc = static_cast<int4 const*>(p.a);  // int32 [M,N], 4 per load
  auto out = static_cast<Out*>(p.d);
  const long long total = static_cast<long long>(p.m) * p.n / kVec;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int4 a4 = acc[v];
    const int accs[kVec] = {a4.x, a4.y, a4.z, a4.w};
    const long long e = v * kVec;
    const int m = static_cast<int>(e / p.n);
    const int n0 = static_cast<int>(e % p.n);
    const float sa = p.a_scale[m];
    const float oa = p.a_offset ? p.a_offset[m] : 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int n = n0 + i;
      // qfx.numerics.int_linear_reference's order, each op rounded on its own (no fma):
      // bit-identical to the reference on the same GPU (see qfx_epilogue.cuh).
      float y = __fmul_rn(__fmul_rn(static_cast<float>(accs[i]), sa), p.w_scale[n]);
      y = __fadd_rn(y, __fmul_rn(oa, p.w_offset_sum ? p.w_offset_sum[n] : 0.f));
      y = __fadd_rn(y, p.bias ? p.bias[n] : 0.f);
      if (p.gelu) y = qfx_gelu(y);
      out[e + i] = to_out<Out>(y);
    }
  }
}

template <class Out>
int launch(QfxGemmArgs const* p) {
  const long long vectors = static_cast<long long>(p->m) * p->n / kVec;
  const long long max_blocks = static_cast<long long>(p->sm_count > 0 ? p->sm_count : 1) * 16;
  long long blocks = (vectors + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  dequant_kernel<Out><<<static_cast<int>(blocks), kThreads, 0, static_cast<cudaStream_t>(p->stream)>>>(*p);
  return cudaPeekAtLastError() == cudaSuccess ? QFX_OK : QFX_LAUNCH_FAILED;
}

}  // namespace

// p->a: the int32 accumulators [M,N]; p->d: the output [M,N] of dtype p->out_dtype.
QFX_API int qfx_dequant_epilogue(QfxGemmArgs const* p) {
  if (p->n % kVec != 0 || p->m < 0) return QFX_BAD_ARGUMENT;
  if (p->m == 0) return QFX_OK;
  switch (p->out_dtype) {
    case QFX_F16: return launch<__half>(p);
    case QFX_BF16: return launch<__nv_bfloat16>(p);
    case QFX_F32: return launch<float>(p);
    default: return QFX_BAD_ARGUMENT;
  }
}

namespace {

// Packed int4 byte b holds code 2i in its low nibble and 2i+1 in its high nibble (two's
// complement), the CUTLASS int4b_t order. Each thread expands 8 bytes into 16 int8 codes.
__global__ void unpack_int4_kernel(uint2 const* packed, int4* out, long long n_vec) {
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < n_vec;
       v += static_cast<long long>(gridDim.x) * blockDim.x) {
    const uint2 p = packed[v];
    const unsigned words[2] = {p.x, p.y};
    unsigned res[4];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        unsigned r = 0;
#pragma unroll
        for (int j = 0; j < 2; ++j) {  // two packed bytes -> four int8 codes
          const unsigned byte = (words[w] >> (8 * (2 * half + j))) & 0xFFu;
          const int lo = static_cast<int>(byte << 28) >> 28;  // sign-extend low nibble
          const int hi = static_cast<int>(byte << 24) >> 28;  // sign-extend high nibble
          r |= (static_cast<unsigned>(lo) & 0xFFu) << (16 * j);
          r |= (static_cast<unsigned>(hi) & 0xFFu) << (16 * j + 8);
        }
        res[2 * w + half] = r;
      }
    }
    out[v] = make_int4(static_cast<int>(res[0]), static_cast<int>(res[1]),
                       static_cast<int>(res[2]), static_cast<int>(res[3]));
  }
}

}  // namespace

// packed: uint8 [bytes], bytes % 8 == 0 and 8-byte aligned; out: int8 [2*bytes], 16-byte aligned.
QFX_API int qfx_unpack_int4(void const* packed, void* out, long long bytes, int sm_count,
                            void* stream) {
  constexpr long long kBytesPerThread = 8;
  if (bytes % kBytesPerThread != 0 || bytes < 0) return QFX_BAD_ARGUMENT;
  const long long n_vec = bytes / kBytesPerThread;
  if (n_vec == 0) return QFX_OK;
  long long blocks = (n_vec + kThreads - 1) / kThreads;
  const long long max_blocks = static_cast<long long>(sm_count > 0 ? sm_count : 1) * 16;
  if (blocks > max_blocks) blocks = max_blocks;
  unpack_int4_kernel<<<static_cast<int>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<uint2 const*>(packed), static_cast<int4*>(out), n_vec);
  return cudaPeekAtLastError() == cudaSuccess ? QFX_OK : QFX_LAUNCH_FAILED;
}

QFX_API int qfx_abi_version() { return QFX_ABI_VERSION; }

// Programmatic dependent launch on or off for every launch after this call (qfx_launch.cuh).
// Python turns it on for sm_90 devices; set before work is queued, not while a launch is in flight.
static int g_pdl = 0;
QFX_API void qfx_set_pdl(int on) { g_pdl = on != 0; }
QFX_API int qfx_pdl_enabled() { return g_pdl; }
