// Programmatic dependent launch (PDL, sm_90): a kernel launched with it may be scheduled while the
// kernel before it in the stream is still finishing (its launch latency and prologue overlap that
// kernel's tail); it must not touch global memory before griddepcontrol.wait, which returns once
// the kernel before it has completed and its writes are visible. A CUDA graph keeps these edges.
//
// The rule that makes it safe: every kernel launched through launch_pdl() calls pdl_wait() before
// its first global load or store, and CUTLASS's sm_90 kernels do the same when built with
// CUTLASS_ENABLE_GDC_FOR_SM90 (CMakeLists.txt). A kernel that waits completes after its
// predecessor, so the ordering holds transitively along the stream; kernels launched any other way
// (torch's, cuDNN's, Triton's) keep the ordinary full dependency. Off (qfx_set_pdl(0), and on
// GPUs before sm_90, where Python never turns it on): plain launches, and the wait is a no-op.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "qfx_abi.h"

QFX_API int qfx_pdl_enabled();

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

template <class... Params, class... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (qfx_pdl_enabled()) {
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}
