// C ABI of the qfx CUTLASS library. Python (backends/cutlass/_library.py) mirrors these
// structs with ctypes; change both together and bump QFX_ABI_VERSION.
#pragma once
#include <stddef.h>
#include <stdint.h>

#define QFX_ABI_VERSION 3
#define QFX_API extern "C" __attribute__((visibility("default")))

// Status codes returned by every entry point (mirrored in _library.py).
enum QfxStatus {
  QFX_OK = 0,
  QFX_CANNOT_IMPLEMENT = 1,  // CUTLASS can_implement() refused the problem
  QFX_INIT_FAILED = 2,       // kernel parameter setup failed
  QFX_LAUNCH_FAILED = 3,     // the launch returned a CUDA error
  QFX_WORKSPACE_TOO_SMALL = 4,
  QFX_BAD_ARGUMENT = 5,
};

// Output element types of the dequant epilogue (mirrored in _library.py).
enum QfxDtype { QFX_F16 = 0, QFX_BF16 = 1, QFX_F32 = 2 };

// One GEMM call: D[M,N] = epilogue(A[M,K] . B[N,K]^T), both operands K-contiguous.
// The epilogue pointers are read only by dequant entry points; a_offset, w_offset_sum and
// bias may be null (the term is then zero). See EPILOGUES.md for the maths.
typedef struct QfxGemmArgs {
  const void* a;              // int8 [M,K] (or packed int4 [M,K/2] for s4 kernels)
  const void* b;              // int8 [N,K] (or packed int4 [N,K/2])
  void* d;                    // int32 [M,N] or out dtype [M,N]
  const float* a_scale;       // [M]
  const float* a_offset;      // [M] or null
  const float* w_scale;       // [N]
  const float* w_offset_sum;  // [N] or null
  const float* bias;          // [N] or null
  int m, n, k;
  int gelu;                   // 0 or 1: exact-erf GELU after the bias
  int out_dtype;              // QfxDtype, for the unfused epilogue kernel
  int sm_count;               // multiprocessors of the device (persistent schedulers)
  int splits;                 // split-K factor for stream-K kernels (1: CUTLASS heuristic)
  void* workspace;            // caller-owned device memory, may be null if size is 0
  size_t workspace_bytes;
  void* stream;               // cudaStream_t
} QfxGemmArgs;
