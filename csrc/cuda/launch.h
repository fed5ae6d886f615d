// Host helpers shared by the CUDA entry points: dtype dispatch onto the CUDA
// storage types, the 16-byte vector test, and the (cluster) launch.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../norm.h"
#include "norm_row.cuh"

namespace normpass {
namespace cuda {

template <typename T> struct Tag { using type = T; };

// Column indices inside a row are 32-bit (row offsets are 64-bit).
constexpr int64_t kMaxCols = (int64_t(1) << 31) - 1024;

// Calls f(std::bool_constant<b>{}): a runtime switch as a compile-time one.
template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// Calls f(vec, flag) with each runtime choice as a compile-time constant: vec
// is an integral_constant of kVec (16-byte accesses) or 1 (scalar accesses),
// flag a bool_constant (the kernel's third switch: the residual add or the
// bias gradient). Centering is a template parameter of the kernels' entry
// (ForwardKernels, BackwardKernels below).
template <int kVec, typename F>
void dispatch_flags(bool vec, bool flag, F&& f) {
  dispatch_bool(flag, [&](auto fl) {
    if (vec) f(std::integral_constant<int, kVec>{}, fl);
    else f(std::integral_constant<int, 1>{}, fl);
  });
}

// Calls f(Tag<T>{}) with T the CUDA storage type of `t`.
template <typename F>
void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: return f(Tag<float>{});
    case at::kHalf: return f(Tag<__half>{});
    case at::kBFloat16: return f(Tag<__nv_bfloat16>{});
    default: TORCH_CHECK(false, "normpass CUDA: unsupported ", what, " dtype ", t);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); }
template <typename T>
T* mut_ptr(at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); }
template <typename T>
const T* ptr(const std::optional<at::Tensor>& t) { return t ? ptr<T>(*t) : nullptr; }

// True when every row of `t` holds whole vectors of `vec` elements, each
// aligned to its size (up to 16 bytes: two accesses for 32), so the kernels
// may access them whole. A 16-bit gradient of fp32 rows has 8-byte vectors.
inline bool vector_ok(const at::Tensor& t, int vec) {
  const auto addr = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  if (addr % std::min<int64_t>(16, vec * t.element_size()) != 0) return false;
  if (t.dim() == 2 && t.size(1) % vec != 0) return false;
  if (t.dim() == 2 && t.size(0) > 1 && t.stride(0) % vec != 0) return false;
  return t.dim() != 1 || t.size(0) % vec == 0;
}
inline bool vector_ok(const std::optional<at::Tensor>& t, int vec) {
  return !t || vector_ok(*t, vec);
}

// The kernels take weight + weight_offset as one weight: folded here in fp32,
// once per call, as eager `x * (1 + w.float())` (Gemma) computes it.
inline std::optional<at::Tensor> fold_offset(const std::optional<at::Tensor>& weight, double offset) {
  if (!weight || offset == 0) return weight;
  return weight->to(at::kFloat).add(offset);
}

inline int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// f() computed once per key and current device: the launch queries below are
// asked on every call, and their answers never change.
template <typename F, typename... Key>
auto memoized(F&& f, const Key&... key) {
  using Value = decltype(f());
  static std::mutex mutex;
  static std::map<std::tuple<int, Key...>, Value> cache;
  const auto k = std::make_tuple(current_device(), key...);
  const std::lock_guard<std::mutex> lock(mutex);
  if (auto it = cache.find(k); it != cache.end()) return it->second;
  return cache[k] = f();
}

inline int device_attribute(cudaDeviceAttr attr) {
  return memoized([&] {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, current_device()));
    return value;
  }, attr);
}

// Peak DRAM bytes per SM per SM clock cycle (double data rate over the memory
// bus), the rate the SMs' loads must keep up with: 12.8 on an H100 SXM (read
// there: 2619 MHz x 5120 bits, 132 SMs at 1980 MHz), 18.8 on an H200 by its
// spec (3201 MHz x 6144 bits); 0 if the device does not report its clocks.
inline double dram_bytes_per_sm_cycle() {
  const double dram = 2e3 * device_attribute(cudaDevAttrMemoryClockRate) *
                      (device_attribute(cudaDevAttrGlobalMemoryBusWidth) / 8);
  const double sm = 1e3 * device_attribute(cudaDevAttrClockRate) *
                    device_attribute(cudaDevAttrMultiProcessorCount);
  return sm > 0 ? dram / sm : 0;
}

// A launch configuration; the cluster dimension, when there is one, is its attribute.
struct LaunchConfig {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[1] = {};

  // cooperative: every CTA resident at once, or the launch fails (CTAs that
  // wait on each other in global memory).
  LaunchConfig(int64_t ctas, int threads, size_t smem, int cluster, bool cooperative = false) {
    cfg.gridDim = dim3(static_cast<unsigned>(ctas));
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    if (cluster > 1) {
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = cluster;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
    } else if (cooperative) {
      attr[0].id = cudaLaunchAttributeCooperative;
      attr[0].val.cooperative = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
    }
  }
  LaunchConfig(const LaunchConfig&) = delete; // cfg.attrs points into this object
};

// Largest cluster (at most 16, Hopper's non-portable limit) of `threads`-thread
// CTAs of `kernel` the device can run; 1 before sm_90 (no clusters).
template <typename... KArgs>
int max_cluster(void (*kernel)(KArgs...), int threads) {
  if (device_attribute(cudaDevAttrComputeCapabilityMajor) < 9) return 1;
  const auto f = reinterpret_cast<const void*>(kernel);
  return memoized([&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    const LaunchConfig c(16, threads, 0, 1);
    int size = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxPotentialClusterSize(&size, f, &c.cfg));
    return std::max(1, std::min(size, 16));
  }, f, threads);
}

// The current stream (the same as at::cuda::getCurrentCUDAStream()).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename... KArgs, typename... Args>
void launch_ex(void (*kernel)(KArgs...), int64_t ctas, int threads, size_t smem, int cluster,
               bool cooperative, Args&&... args) {
  TORCH_CHECK(ctas > 0 && ctas <= INT32_MAX, "normpass CUDA: grid of ", std::to_string(ctas), " CTAs");
  LaunchConfig c(ctas, threads, smem, cluster, cooperative);
  c.cfg.stream = current_stream();
  C10_CUDA_CHECK(cudaLaunchKernelEx(&c.cfg, kernel, std::forward<Args>(args)...));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int64_t ctas, int threads, size_t smem, int cluster,
            Args&&... args) {
  launch_ex(kernel, ctas, threads, smem, cluster, false, std::forward<Args>(args)...);
}

// Clusters of `cluster` CTAs of `kernel` that run at once, 0 if none can.
// A cluster lives in one GPC, so this can be less than the resident CTAs over
// `cluster`: sizing a persistent grid by that quotient once left one cluster
// to run after all the others.
template <typename... KArgs>
int64_t resident_clusters(void (*kernel)(KArgs...), int threads, size_t smem, int cluster) {
  const auto f = reinterpret_cast<const void*>(kernel);
  return memoized([&]() -> int64_t {
    if (cluster == 1) {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, f, threads, smem));
      return int64_t(per_sm) * device_attribute(cudaDevAttrMultiProcessorCount);
    }
    const LaunchConfig c(cluster, threads, smem, cluster);
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, f, &c.cfg));
    return n;
  }, f, threads, smem, cluster);
}

// Sets `kernel`'s dynamic shared memory limit, once per device (always the same
// value: a lower one set per call could race a launch on another thread).
template <typename... KArgs>
void set_max_dynamic_smem(void (*kernel)(KArgs...), size_t bytes) {
  const auto f = reinterpret_cast<const void*>(kernel);
  memoized([&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
    return bytes;
  }, f);
}

// The kernels of one input dtype T and one norm (CENTER: LayerNorm, else
// RMSNorm) behind the entry points' signatures (../norm.h), after their
// checks; the backward's also of one gradient dtype G (T, fp32 for 16-bit T,
// or 16 bits for fp32 T). Each is instantiated in a file of its own,
// norm_{forward,backward}_<dtype>[_<dtype>grad]_{ln,rms}.cu, so that the build
// compiles them in parallel (all in one file took 4.6 minutes; a file per
// dtype left the bf16 backward alone at 2 minutes).
template <typename T, bool CENTER> struct ForwardKernels { static NormForward run; };
template <typename T, typename G, bool CENTER> struct BackwardKernels { static NormBackward run; };

} // namespace cuda
} // namespace normpass
