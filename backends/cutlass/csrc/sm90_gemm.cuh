// CUTLASS 3.x warp-specialized int8 x int8 GEMMs for sm_90a (wgmma), instantiated once per
// row of the kernel-config table (configs.py) by generate_kernels.py.
//
// Two epilogues per config:
//   * s32:     D = acc (int32), for bit-exact tests and the unfused path;
//   * dequant: D = half(maybe_gelu(((acc*a_scale[m])*w_scale[n] + a_offset[m]*w_offset_sum[n])
//                                   + bias[n])), an epilogue visitor tree (EVT). Null
//              a_offset / w_offset_sum / bias read as zero; gelu is a runtime switch, so one
//              instantiation serves linear and linear+GELU.
#pragma once
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "qfx_abi.h"
#include "qfx_launch.cuh"
#include "qfx_epilogue.cuh"

namespace qfx::sm90 {
using namespace cute;

// Runtime switch for the last EVT node; a uniform branch per thread, so no divergence.
struct GeluSwitch {
  int enabled = 0;
};

// The tail of the dequant epilogue, in qfx.numerics.int_linear_reference's fp32 order:
//   y = (scaled + a_offset*ws) + bias,  then GELU(y) = y*0.5 * (1 + erf(y/sqrt 2)) when enabled.
// Explicit round-to-nearest intrinsics: nvcc would otherwise contract a*b+c into one fma,
// whose single rounding differs from torch's separate ops in ~6% of outputs (measured on the
// H100); with them the epilogue is bit-identical to the reference on the same GPU, GELU
// included (that expression matches torch.nn.functional.gelu bit for bit on CUDA).
template <class T>
struct DequantTail {
  using Arguments = GeluSwitch;
};

template <class T, int N>
struct DequantTail<cutlass::Array<T, N>> {
  using Arguments = GeluSwitch;
  CUTLASS_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& a_offset,
                                                 cutlass::Array<T, N> const& w_offset_sum,
                                                 cutlass::Array<T, N> const& scaled,
                                                 cutlass::Array<T, N> const& bias,
                                                 Arguments const& args) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i)
      y[i] = __fadd_rn(__fadd_rn(scaled[i], __fmul_rn(a_offset[i], w_offset_sum[i])), bias[i]);
    if (args.enabled) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < N; ++i) y[i] = qfx_gelu(y[i]);
    }
    return y;
  }
};

struct Cooperative {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
struct Pingpong {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
};

using ElementAB = int8_t;
using ElementAcc = int32_t;
using LayoutA = cutlass::layout::RowMajor;     // [M,K], K contiguous
using LayoutB = cutlass::layout::ColumnMajor;  // [K,N] column-major == [N,K] row-major
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignAB = 128 / cutlass::sizeof_bits<ElementAB>::value;  // 16-byte TMA rows
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

template <class Tile>
struct DequantTree {
  using ColF32 = cutlass::epilogue::fusion::Sm90ColBroadcast<0, Tile, float, float>;
  using RowF32 = cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, float, float>;
  template <template <class> class Fn, class Out>
  using Op = cutlass::epilogue::fusion::Sm90Compute<Fn, Out, float, kRound>;
  template <class Node, class... Children>
  using EVT = cutlass::epilogue::fusion::Sm90EVT<Node, Children...>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;

  // Products only feed products or the __fadd_rn of DequantTail, so none is contracted.
  using ScaledByRow = EVT<Op<cutlass::multiplies, float>, Acc, ColF32>;           // acc*a_scale
  using Scaled = EVT<Op<cutlass::multiplies, float>, ScaledByRow, RowF32>;        // *w_scale
  using Root = EVT<Op<DequantTail, cutlass::half_t>,                              // + a_off*ws
                   ColF32, RowF32, Scaled, RowF32>;                               // + bias
};

template <class Tile>
struct IdentityTree {
  using Root = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::Identity, int32_t,
                                             int32_t, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch>;
};

// Scheduler: void = persistent tile scheduler; cutlass::gemm::StreamKScheduler = stream-K.
// EpiTile: the epilogue subtile (one barrier and TMA store each), or EpilogueTileAuto.
template <class Tile, class Cluster, class Schedule, class Scheduler, class ElementD, class Fusion,
          class EpiTile = cutlass::epilogue::collective::EpilogueTileAuto>
struct Gemm {
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
  using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      EpiTile, ElementAcc, float, void, LayoutD, kAlignD,
      ElementD, LayoutD, kAlignD, typename Schedule::Epilogue, Fusion>::CollectiveOp;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, LayoutA, kAlignAB,
      ElementAB, LayoutB, kAlignAB, ElementAcc, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epi::SharedStorage))>,
      typename Schedule::Kernel>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi, Scheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static constexpr bool kStreamK = std::is_same_v<Scheduler, cutlass::gemm::StreamKScheduler>;
};

template <class G>
typename G::Device::Arguments make_arguments(QfxGemmArgs const& p,
                                             typename G::Epi::FusionCallbacks::Arguments fusion) {
  using K = typename G::Kernel;
  auto sa = cutlass::make_cute_packed_stride(typename K::StrideA{}, {p.m, p.k, 1});
  auto sb = cutlass::make_cute_packed_stride(typename K::StrideB{}, {p.n, p.k, 1});
  auto sd = cutlass::make_cute_packed_stride(typename K::StrideD{}, {p.m, p.n, 1});
  cutlass::KernelHardwareInfo hw;
  hw.sm_count = p.sm_count;
  using EA = typename G::Device::Arguments;
  EA args{cutlass::gemm::GemmUniversalMode::kGemm,
          {p.m, p.n, p.k, 1},
          {static_cast<ElementAB const*>(p.a), sa, static_cast<ElementAB const*>(p.b), sb},
          {fusion, nullptr, typename K::StrideC{}, static_cast<typename G::Epi::ElementD*>(p.d), sd},
          hw};
  if constexpr (G::kStreamK) args.scheduler.splits = p.splits > 1 ? p.splits : 1;
  return args;
}

template <class G>
size_t workspace_size(QfxGemmArgs const* p) {
  auto args = make_arguments<G>(*p, {});
  return G::Device::get_workspace_size(args);
}

template <class G>
int run(typename G::Device::Arguments const& args, QfxGemmArgs const* p) {
  typename G::Device gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return QFX_CANNOT_IMPLEMENT;
  if (G::Device::get_workspace_size(args) > p->workspace_bytes) return QFX_WORKSPACE_TOO_SMALL;
  auto stream = static_cast<cudaStream_t>(p->stream);
  if (gemm.initialize(args, p->workspace, stream) != cutlass::Status::kSuccess)
    return QFX_INIT_FAILED;
  // launched with PDL when it is on: the kernel waits for its predecessor (qfx_launch.cuh)
  if (gemm.run(stream, nullptr, qfx_pdl_enabled() != 0) != cutlass::Status::kSuccess) return QFX_LAUNCH_FAILED;
  return cudaPeekAtLastError() == cudaSuccess ? QFX_OK : QFX_LAUNCH_FAILED;
}

template <class Tile, class Cluster, class Schedule, class Scheduler = void,
          class EpiTile = cutlass::epilogue::collective::EpilogueTileAuto>
struct Config {
  using S32 = Gemm<Tile, Cluster, Schedule, Scheduler, int32_t, typename IdentityTree<Tile>::Root, EpiTile>;
  using Dequant = Gemm<Tile, Cluster, Schedule, Scheduler, cutlass::half_t,
                       typename DequantTree<Tile>::Root, EpiTile>;

  static int run_s32(QfxGemmArgs const* p) {
    return run<S32>(make_arguments<S32>(*p, {}), p);
  }

  static int run_dequant(QfxGemmArgs const* p) {
    // Nested EVT arguments: {children..., node}; see DequantTree for the tree.
    typename Dequant::Epi::FusionCallbacks::Arguments fusion{
        {p->a_offset, 0.f, {}},                             // a_offset[m]
        {p->w_offset_sum, 0.f, {}},                         // w_offset_sum[n]
        {                                                   // Scaled
         {{}, {p->a_scale, 0.f, {}}, {}},                   //   acc * a_scale[m]
         {p->w_scale, 0.f, {}},                             //   w_scale[n]
         {}},
        {p->bias, 0.f, {}},                                 // bias[n]
        {p->gelu}};                                         // DequantTail's GELU switch
    return run<Dequant>(make_arguments<Dequant>(*p, fusion), p);
  }

  static size_t workspace_s32(QfxGemmArgs const* p) { return workspace_size<S32>(p); }
  static size_t workspace_dequant(QfxGemmArgs const* p) { return workspace_size<Dequant>(p); }
};

}  // namespace qfx::sm90
