// CUTLASS 2.x multistage tensor-core GEMMs for sm_80/86/89: INT4 x INT4 (mma m16n8k64 s4) and
// INT8 x INT8 (mma m16n8k32 s8), int32 output. The dequant epilogue runs as a separate kernel
// (support_kernels.cu) on these architectures: one extra read+write of the int32 tile.
#pragma once
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm.h"

#include "qfx_abi.h"

namespace qfx::sm80 {

template <class Element, class TileShape, class WarpShape, class InstShape, int Stages>
struct Config {
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte loads
  // D = acc exactly: no alpha/beta, int32 in and out.
  using Epilogue = cutlass::epilogue::thread::LinearCombination<
      int32_t, 128 / 32, int32_t, int32_t, cutlass::epilogue::thread::ScaleType::Nothing>;
  using Device = cutlass::gemm::device::Gemm<
      Element, cutlass::layout::RowMajor, Element, cutlass::layout::ColumnMajor, int32_t,
      cutlass::layout::RowMajor, int32_t, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      TileShape, WarpShape, InstShape, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Stages, kAlign, kAlign,
      false, cutlass::arch::OpMultiplyAddSaturate>;

  static int run_s32(QfxGemmArgs const* p) {
    auto a = static_cast<Element const*>(p->a);
    auto b = static_cast<Element const*>(p->b);
    auto d = static_cast<int32_t*>(p->d);
    typename Device::Arguments args({p->m, p->n, p->k}, {a, p->k}, {b, p->k}, {d, p->n},
                                    {d, p->n}, {});
    Device gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return QFX_CANNOT_IMPLEMENT;
    if (Device::get_workspace_size(args) > p->workspace_bytes) return QFX_WORKSPACE_TOO_SMALL;
    auto stream = static_cast<cudaStream_t>(p->stream);
    if (gemm.initialize(args, p->workspace, stream) != cutlass::Status::kSuccess)
      return QFX_INIT_FAILED;
    if (gemm(stream) != cutlass::Status::kSuccess) return QFX_LAUNCH_FAILED;
    return cudaPeekAtLastError() == cudaSuccess ? QFX_OK : QFX_LAUNCH_FAILED;
  }

  static size_t workspace_s32(QfxGemmArgs const* p) {
    typename Device::Arguments args({p->m, p->n, p->k}, {nullptr, p->k}, {nullptr, p->k},
                                    {nullptr, p->n}, {nullptr, p->n}, {});
    return Device::get_workspace_size(args);
  }
};

}  // namespace qfx::sm80
