// Device helpers shared by the forward and backward selective scan kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "scan.h"

namespace hzoo {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

// The lane's K tokens at p as floats, one or more 16-byte loads (p aligned, all K valid).
// The vector type of K tokens: 16-byte loads, or 8-byte ones for 4 half-precision tokens.
template <typename T, int K>
struct TokenVec {
  static_assert(sizeof(T) * K % 8 == 0, "K tokens must fill whole 8-byte vectors");
  using type = typename std::conditional<sizeof(T) * K % 16 == 0, uint4, uint2>::type;
  static constexpr int kCount = sizeof(T) * K / sizeof(type);
};

template <typename T, int K>
__device__ __forceinline__ void load_tokens_vec(const T* p, float (&v)[K]) {
  using V = typename TokenVec<T, K>::type;
  V raw[TokenVec<T, K>::kCount];
#pragma unroll
  for (int i = 0; i < TokenVec<T, K>::kCount; ++i) raw[i] = __ldg(reinterpret_cast<const V*>(p) + i);
  const T* t = reinterpret_cast<const T*>(raw);
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = to_float(t[k]);
}

template <typename T, int K>
__device__ __forceinline__ bool vec_aligned(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(typename TokenVec<T, K>::type)) == 0;
}

// The lane's K tokens starting at p; positions at or past `valid` read as 0. 16-byte loads when
// the run is whole and aligned (widths or offsets that are not multiples of 8 take the scalar path).
template <typename T, int K>
__device__ __forceinline__ void load_tokens(const T* p, int valid, float (&v)[K]) {
  if (valid >= K && vec_aligned<T, K>(p)) {
    load_tokens_vec<T, K>(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = k < valid ? to_float(p[k]) : 0.f;
  }
}

// B or C rows of one (batch, group) for the lane's tokens: the pointer and the vector-or-scalar
// decision are made once per chunk; the state loops then step the pointer by stride_n per index.
template <typename T, int K>
struct LaneRows {
  const T* base;
  int64_t stride_n;
  bool vec;
  __device__ __forceinline__ LaneRows(const void* ptr, int64_t sb, int64_t sg, int64_t sn, int b, int g, int t0,
                                      int valid)
      : base(static_cast<const T*>(ptr) + b * sb + g * sg + t0), stride_n(sn),
        vec(valid >= K && vec_aligned<T, K>(static_cast<const T*>(ptr) + b * sb + g * sg + t0) &&
            (sn * static_cast<int64_t>(sizeof(T))) % sizeof(typename TokenVec<T, K>::type) == 0) {}
};

template <typename T, int K>
__device__ __forceinline__ void store_tokens(T* p, int valid, const float (&v)[K]) {
  using V = typename TokenVec<T, K>::type;
  if (valid >= K && vec_aligned<T, K>(p)) {
    V raw[TokenVec<T, K>::kCount];
    T* t = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int k = 0; k < K; ++k) t[k] = from_float<T>(v[k]);
#pragma unroll
    for (int i = 0; i < TokenVec<T, K>::kCount; ++i) reinterpret_cast<V*>(p)[i] = raw[i];
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (k < valid) p[k] = from_float<T>(v[k]);
  }
}

// dt from delta + bias (softplus or identity) and d dt / d(delta + bias)
__device__ __forceinline__ float delta_to_dt(float x, bool softplus) {
  return softplus && x <= 20.f ? log1pf(expf(x)) : x;
}
__device__ __forceinline__ float dt_derivative(float x, bool softplus) {
  return softplus && x <= 20.f ? sigmoidf(x) : 1.f;
}

// -inf at the lane's tokens that start a new document (exp2(dt A + reset) = 0 there), else 0
template <int K>
__device__ __forceinline__ void load_resets(const ScanParams& p, int b, int t0, int valid, float (&reset)[K]) {
  const int32_t* sid = p.seq_idx + static_cast<int64_t>(b) * p.seqlen;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int t = t0 + k;
    reset[k] = k < valid && t > 0 && sid[t] != sid[t - 1] ? __int_as_float(0xff800000) : 0.f;
  }
}

// Per-lane token data of the forward: dt after bias/softplus, u, and which tokens start a new
// document (their decay is 0: nothing from before reaches them).
template <int K>
struct LaneTokens {
  float u[K], dt[K];
  float reset[K];                  // -inf at a document's first token (exp2(dt A + reset) = 0), else 0
};

// kSeqIdx: the launch has seq_idx (the reset array is loaded; without it, reset stays a constant 0
// that the compiler folds away, which saves registers in the scan loops)
template <typename in_t, int K, bool kSeqIdx>
__device__ __forceinline__ void load_lane_tokens(const ScanParams& p, int b, int d, int t0, int valid,
                                                 LaneTokens<K>& lt) {
  const in_t* u = static_cast<const in_t*>(p.u) + b * p.u_sb + d * p.u_sd + t0;
  const in_t* delta = static_cast<const in_t*>(p.delta) + b * p.delta_sb + d * p.delta_sd + t0;
  load_tokens<in_t, K>(u, valid, lt.u);
  float raw[K];
  load_tokens<in_t, K>(delta, valid, raw);
  const float bias = p.delta_bias != nullptr ? p.delta_bias[d] : 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float x = raw[k] + bias;
    lt.dt[k] = k < valid ? delta_to_dt(x, p.delta_softplus) : 0.f;   // padding: decay 1, no input
  }
  if constexpr (kSeqIdx) {
    load_resets<K>(p, b, t0, valid, lt.reset);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) lt.reset[k] = 0.f;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Calls Launch<in_t, bc_t>::run for the dtype pair (B and C are u's dtype or float32).
template <template <typename, typename> class Launch>
void dispatch_dtypes(const ScanParams& p, cudaStream_t stream) {
  const bool same = p.in_kind == p.bc_kind;
  switch (p.in_kind) {
    case kFloat32: Launch<float, float>::run(p, stream); break;
    case kFloat16:
      if (same) Launch<__half, __half>::run(p, stream); else Launch<__half, float>::run(p, stream);
      break;
    case kBFloat16:
      if (same) Launch<__nv_bfloat16, __nv_bfloat16>::run(p, stream); else Launch<__nv_bfloat16, float>::run(p, stream);
      break;
  }
}

}  // namespace detail
}  // namespace hzoo
