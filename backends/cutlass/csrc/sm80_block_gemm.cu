// Block-scaled integer linear for sm_80/86/89 (issue 23 item 5): QuantConfig(act_block=B) on the
// Ampere / Ada integer tensor cores, mma.sync m16n8k64 s4 (both operands 4-bit: native INT4) or
// m16n8k32 s8, with each activation block's exact int32 sum promoted to an fp32 accumulator in
// registers every B input channels.
//
// The numerics are qfx.numerics.int_linear_blocks_reference's (backends/cutlass/EPILOGUES.md,
// "Block-scaled activations"), operation for operation, every fp32 operation rounded once
// (__fmul_rn / __fadd_rn: nothing is contracted into an fma):
//
//   for each block j (B channels):  acc_j = sum q_a * q_w               exact int32 (mma.sync)
//     t = float(acc_j) * s_a[m, j]                                     exact conversion (exact_float), one rounding
//     t = t + (c_a[m, j] * bs[n, j])                                   a_offset given only
//     t = t * s_w[n, j * G / J]                                        grouped weights only (G > 1)
//     p = p + t                                                        blocks in K order, p = 0 first
//   y = p * s_w[n]  (G == 1);  y = y + bias[n];  GELU (torch's exact-erf form);  round to the out dtype
//
// Operands (all K-contiguous, 16-byte aligned base pointers):
//   a: int8 activation codes [M, K] (4-bit codes in [-8, 7] when operand_s4: packed to nibbles here,
//      on the way from shared memory into the MMA registers); w: packed int4 [N, K/2]
//      (qfx.numerics.pack_int4 order: low nibble = even k) when operand_s4, else int8 codes [N, K].
//   a_scale, a_offset [M, J]; w_scale [N, G]; w_block_sums [N, J]; bias [N] fp32; J = K / act_block.
// Constraints: act_block % 64 == 0, K % act_block == 0, G divides J; any M >= 0, N >= 1.
//
// Compiled in the sm80 family's object library (sm_80/86/89 SASS + compute_80 PTX), so an H100
// JIT-compiles the PTX and runs it: exact there (the tests), never timed there (s4 mma is emulated
// on sm_90). Tile shapes are template data (kTiles below); cp.async multistage pipeline.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "qfx_abi.h"
#include "qfx_epilogue.cuh"

namespace {

constexpr int kChunkK = 64;   // K codes per pipeline stage: one m16n8k64 s4 or two m16n8k32 s8 steps
constexpr int kWarpSize = 32;

template <class T> __device__ __forceinline__ T to_out(float x);
template <> __device__ __forceinline__ __half to_out<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ float to_out<float>(float x) { return x; }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Eight int8 codes in [-8, 7] (bytes 0..3 of lo, then of hi) -> eight two's-complement nibbles,
// code i in bits [4i, 4i + 4): the register order of an s4 mma operand (and of pack_int4).
__device__ __forceinline__ uint32_t pack_nibbles(uint32_t lo, uint32_t hi) {
  uint32_t a = lo & 0x0F0F0F0Fu, b = hi & 0x0F0F0F0Fu;
  a |= a >> 4;  // byte 0: codes 0,1; byte 2: codes 2,3
  b |= b >> 4;
  return __byte_perm(a, b, 0x6420);
}

// float(acc), exactly. For |acc| <= 2^22 (blocks of at most 256 codes: |acc| <= 256 * 128 * 128) the fp32
// whose bits are acc + bits(1.5 * 2^23) is 1.5 * 2^23 + acc exactly, and the subtraction is exact: an int32
// add and an fp32 subtract, full-rate on the CUDA cores, where the int32 -> fp32 conversion instruction runs
// at a quarter of the fp32 rate (the promotion of every block is this kernel's CUDA-core work; the cost
// model prices it so). Larger blocks: the conversion instruction (round to nearest, as torch's .float()).
__device__ __forceinline__ float exact_float(int acc, bool small) {
  return small ? __fsub_rn(__int_as_float(acc + 0x4B400000), 12582912.0f) : __int2float_rn(acc);
}

// One mma.sync per operand type: the same fragments (4 int32 accumulators, 4 + 2 registers of codes); the
// instruction string is all that differs, and inline asm takes only a literal, hence the macro.
#define QFX_MMA_SYNC(NAME, INSTRUCTION)                                                          \
  __device__ __forceinline__ void NAME(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { \
    asm volatile(INSTRUCTION " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"        \
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])                                 \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));             \
  }
QFX_MMA_SYNC(mma_s4, "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32")
QFX_MMA_SYNC(mma_s8, "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32")
#undef QFX_MMA_SYNC

// f(i, j, e) for every accumulator element of a warp's tile (i: 16-row MMA tile, j: 8-column MMA tile, e: one
// of the 4 elements a thread holds), fully unrolled: the arrays f indexes stay in registers.
template <class T, class F>
__device__ __forceinline__ void for_each_accumulator(F&& f) {
#pragma unroll
  for (int i = 0; i < T::kMI; ++i)
#pragma unroll
    for (int j = 0; j < T::kNI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(i, j, e);
}

struct BlockArgs {
  const int8_t* a;
  const uint8_t* w;
  void* out;
  const float* a_scale;
  const float* a_offset;  // null: symmetric codes, the offset term is skipped
  const float* w_scale;
  const float* w_block_sums;
  const float* bias;  // null: no bias
  int m, n, k, blocks, groups, chunks_per_block, gelu;
};

// One CTA computes a BM x BN output tile with WM x WN warps (each a (BM/WM) x (BN/WN) warp tile of
// 16 x 8 mma tiles). S4: both operands 4-bit (m16n8k64 s4); else int8 (m16n8k32 s8).
template <int BM, int BN, int WM, int WN, int STAGES, bool S4>
struct Tile {
  static constexpr int kThreads = WM * WN * kWarpSize;
  static constexpr int kWarpM = BM / WM, kWarpN = BN / WN;
  static constexpr int kMI = kWarpM / 16, kNI = kWarpN / 8;
  // shared-memory rows, padded by 16 bytes (cp.async keeps 16-byte alignment; fewer bank conflicts)
  static constexpr int kAStride = kChunkK + 16;                  // int8 codes
  static constexpr int kWBytes = S4 ? kChunkK / 2 : kChunkK;     // one stage of one weight row
  static constexpr int kWStride = kWBytes + 16;
  static constexpr int kStageBytes = BM * kAStride + BN * kWStride;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(kWarpM % 16 == 0 && kWarpN % 8 == 0, "warp tile must hold whole mma tiles");
  static_assert(STAGES >= 2, "at least double buffering");
};

template <int BM, int BN, int WM, int WN, int STAGES, bool S4, class Out>
__global__ void __launch_bounds__(WM * WN * kWarpSize)
block_linear_kernel(BlockArgs p) {
  using T = Tile<BM, BN, WM, WN, STAGES, S4>;
  extern __shared__ __align__(16) uint8_t smem[];

  const int tid = threadIdx.x;
  const int warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int g = lane >> 2, t = lane & 3;  // mma groupID, threadID_in_group
  const int wm = warp / WN, wn = warp % WN;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int chunks = p.k / kChunkK;
  const size_t w_row_bytes = S4 ? static_cast<size_t>(p.k) / 2 : static_cast<size_t>(p.k);

  // Stage loader: rows past M / N read the last valid row (their results are never stored).
  auto load_stage = [&](int slot, int chunk) {
    uint8_t* as = smem + slot * T::kStageBytes;
    uint8_t* ws = as + BM * T::kAStride;
    constexpr int a_segs = kChunkK / 16;
    for (int i = tid; i < BM * a_segs; i += T::kThreads) {
      const int row = i / a_segs, seg = i % a_segs;
      const int gm = min(m0 + row, p.m - 1);
      cp_async16(as + row * T::kAStride + seg * 16,
                 p.a + static_cast<size_t>(gm) * p.k + static_cast<size_t>(chunk) * kChunkK + seg * 16);
    }
    constexpr int w_segs = T::kWBytes / 16;
    for (int i = tid; i < BN * w_segs; i += T::kThreads) {
      const int row = i / w_segs, seg = i % w_segs;
      const int gn = min(n0 + row, p.n - 1);
      cp_async16(ws + row * T::kWStride + seg * 16,
                 p.w + static_cast<size_t>(gn) * w_row_bytes + static_cast<size_t>(chunk) * T::kWBytes + seg * 16);
    }
  };

  int acc[T::kMI][T::kNI][4];
  float part[T::kMI][T::kNI][4];
  for_each_accumulator<T>([&](int i, int j, int e) {
    acc[i][j][e] = 0;
    part[i][j][e] = 0.f;
  });

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < chunks) load_stage(s, s);
    cp_async_commit();  // empty groups keep the wait count uniform
  }

  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // chunk c is in shared memory; every warp is done with chunk c - 1's slot
    const int next = c + STAGES - 1;
    if (next < chunks) load_stage(next % STAGES, next);
    cp_async_commit();

    const uint8_t* as = smem + (c % STAGES) * T::kStageBytes;
    const uint8_t* ws = as + BM * T::kAStride;
    constexpr int steps = S4 ? 1 : kChunkK / 32;
#pragma unroll
    for (int kk = 0; kk < steps; ++kk) {
      uint32_t af[T::kMI][4];
      uint32_t bf[T::kNI][2];
#pragma unroll
      for (int i = 0; i < T::kMI; ++i) {
        const uint8_t* r0 = as + (wm * T::kWarpM + i * 16 + g) * T::kAStride;
        const uint8_t* r8 = r0 + 8 * T::kAStride;
        if constexpr (S4) {  // a0..7: row g, k = 8t..8t+7; a8..15: row g+8; a16..31: k + 32
          const uint2 x0 = *reinterpret_cast<const uint2*>(r0 + 8 * t);
          const uint2 x1 = *reinterpret_cast<const uint2*>(r8 + 8 * t);
          const uint2 x2 = *reinterpret_cast<const uint2*>(r0 + 32 + 8 * t);
          const uint2 x3 = *reinterpret_cast<const uint2*>(r8 + 32 + 8 * t);
          af[i][0] = pack_nibbles(x0.x, x0.y);
          af[i][1] = pack_nibbles(x1.x, x1.y);
          af[i][2] = pack_nibbles(x2.x, x2.y);
          af[i][3] = pack_nibbles(x3.x, x3.y);
        } else {  // a0..3: row g, k = 4t..4t+3; a4..7: row g+8; a8..15: k + 16
          const int k0 = kk * 32 + 4 * t;
          af[i][0] = *reinterpret_cast<const uint32_t*>(r0 + k0);
          af[i][1] = *reinterpret_cast<const uint32_t*>(r8 + k0);
          af[i][2] = *reinterpret_cast<const uint32_t*>(r0 + k0 + 16);
          af[i][3] = *reinterpret_cast<const uint32_t*>(r8 + k0 + 16);
        }
      }
#pragma unroll
      for (int j = 0; j < T::kNI; ++j) {
        const uint8_t* wr = ws + (wn * T::kWarpN + j * 8 + g) * T::kWStride;
        if constexpr (S4) {  // b0..7: column g, k = 8t..8t+7 (4 packed bytes); b8..15: k + 32
          bf[j][0] = *reinterpret_cast<const uint32_t*>(wr + 4 * t);
          bf[j][1] = *reinterpret_cast<const uint32_t*>(wr + 16 + 4 * t);
        } else {  // b0..3: column g, k = 4t..4t+3; b4..7: k + 16
          bf[j][0] = *reinterpret_cast<const uint32_t*>(wr + kk * 32 + 4 * t);
          bf[j][1] = *reinterpret_cast<const uint32_t*>(wr + kk * 32 + 16 + 4 * t);
        }
      }
#pragma unroll
      for (int i = 0; i < T::kMI; ++i)
#pragma unroll
        for (int j = 0; j < T::kNI; ++j) {
          if constexpr (S4) mma_s4(acc[i][j], af[i], bf[j]);
          else mma_s8(acc[i][j], af[i], bf[j]);
        }
    }

    if ((c + 1) % p.chunks_per_block == 0) {  // the end of activation block jb: promote, in K order
      const int jb = (c + 1) / p.chunks_per_block - 1;
      const bool small = p.chunks_per_block * kChunkK <= 256;
      const int gj = p.groups > 1 ? jb * p.groups / p.blocks : 0;
#pragma unroll
      for (int i = 0; i < T::kMI; ++i) {
        float sa[2], ca[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // c0, c1: row g; c2, c3: row g + 8
          const int gm = min(m0 + wm * T::kWarpM + i * 16 + g + 8 * h, p.m - 1);
          sa[h] = p.a_scale[static_cast<size_t>(gm) * p.blocks + jb];
          ca[h] = p.a_offset ? p.a_offset[static_cast<size_t>(gm) * p.blocks + jb] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < T::kNI; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int gn = min(n0 + wn * T::kWarpN + j * 8 + 2 * t + (e & 1), p.n - 1);
            float v = __fmul_rn(exact_float(acc[i][j][e], small), sa[e >> 1]);
            if (p.a_offset) v = __fadd_rn(v, __fmul_rn(ca[e >> 1], p.w_block_sums[static_cast<size_t>(gn) * p.blocks + jb]));
            if (p.groups > 1) v = __fmul_rn(v, p.w_scale[static_cast<size_t>(gn) * p.groups + gj]);
            part[i][j][e] = __fadd_rn(part[i][j][e], v);
            acc[i][j][e] = 0;
          }
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the CTA (only empty groups are left)

  Out* out = static_cast<Out*>(p.out);
#pragma unroll
  for (int i = 0; i < T::kMI; ++i)
#pragma unroll
    for (int j = 0; j < T::kNI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int gm = m0 + wm * T::kWarpM + i * 16 + g + 8 * (e >> 1);
        const int gn = n0 + wn * T::kWarpN + j * 8 + 2 * t + (e & 1);
        if (gm >= p.m || gn >= p.n) continue;
        float y = p.groups > 1 ? part[i][j][e] : __fmul_rn(part[i][j][e], p.w_scale[gn]);
        if (p.bias) y = __fadd_rn(y, p.bias[gn]);
        if (p.gelu) y = qfx_gelu(y);
        out[static_cast<size_t>(gm) * p.n + gn] = to_out<Out>(y);
      }
}

template <int BM, int BN, int WM, int WN, int STAGES, bool S4, class Out>
int launch_tile(BlockArgs const& args, cudaStream_t stream) {
  using T = Tile<BM, BN, WM, WN, STAGES, S4>;
  auto kernel = block_linear_kernel<BM, BN, WM, WN, STAGES, S4, Out>;
  if (T::kSmemBytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes) != cudaSuccess)
    return QFX_LAUNCH_FAILED;
  const dim3 grid((args.m + BM - 1) / BM, (args.n + BN - 1) / BN);
  if (grid.y > 65535) return QFX_BAD_ARGUMENT;
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(args);
  return cudaPeekAtLastError() == cudaSuccess ? QFX_OK : QFX_LAUNCH_FAILED;
}

// The tile table (Python: qfx.backends.cutlass.block_linear.TILES names the same rows): tile 0 for
// small M (more CTAs), tile 1 for large M.
template <bool S4, class Out>
int launch(BlockArgs const& args, int tile, cudaStream_t stream) {
  switch (tile) {
    case 0: return launch_tile<32, 128, 1, 4, 3, S4, Out>(args, stream);
    case 1: return launch_tile<128, 128, 2, 4, 3, S4, Out>(args, stream);
    default: return QFX_BAD_ARGUMENT;
  }
}

template <bool S4>
int launch_dtype(BlockArgs const& args, int out_dtype, int tile, cudaStream_t stream) {
  switch (out_dtype) {
    case QFX_F16: return launch<S4, __half>(args, tile, stream);
    case QFX_BF16: return launch<S4, __nv_bfloat16>(args, tile, stream);
    case QFX_F32: return launch<S4, float>(args, tile, stream);
    default: return QFX_BAD_ARGUMENT;
  }
}

}  // namespace

// The block-scaled integer linear (see the top of this file). operand_s4: 1 for packed int4 weights
// and 4-bit activation codes (m16n8k64 s4), 0 for int8 codes on both sides (m16n8k32 s8). tile:
// a row of the tile table (0: small M, 1: large M). a_offset and bias may be null.
QFX_API int qfx_sm80_block_linear(const void* a, const void* w, void* out, const float* a_scale,
                                  const float* a_offset, const float* w_scale,
                                  const float* w_block_sums, const float* bias, int m, int n, int k,
                                  int act_block, int groups, int operand_s4, int gelu,
                                  int out_dtype, int tile, void* stream) {
  if (m < 0 || n <= 0 || k <= 0 || act_block <= 0 || act_block % kChunkK || k % act_block)
    return QFX_BAD_ARGUMENT;
  const int blocks = k / act_block;
  if (groups < 1 || blocks % groups) return QFX_BAD_ARGUMENT;
  if (!a || !w || !out || !a_scale || !w_scale || (a_offset && !w_block_sums)) return QFX_BAD_ARGUMENT;
  if (m == 0) return QFX_OK;
  BlockArgs args{static_cast<const int8_t*>(a), static_cast<const uint8_t*>(w), out, a_scale, a_offset,
                 w_scale, w_block_sums, bias, m, n, k, blocks, groups, act_block / kChunkK, gelu ? 1 : 0};
  auto s = static_cast<cudaStream_t>(stream);
  return operand_s4 ? launch_dtype<true>(args, out_dtype, tile, s) : launch_dtype<false>(args, out_dtype, tile, s);
}

// Number of rows of the tile table (lets Python check that it and this library agree).
QFX_API int qfx_sm80_block_linear_tiles() { return 2; }
