// Selective scan (Mamba-1) forward, one warp per (batch, channel).
//
// Recurrence per channel d and state index n (fp32 state):
//   h_t = exp(dt_t A_n) h_{t-1} + dt_t B_{n,t} u_t,   y_t = sum_n C_{n,t} h_t + D u_t,   out_t = y_t silu(z_t)
//
// A warp owns one channel and walks the sequence 32*K tokens at a time; lane i holds K consecutive
// tokens, loaded with 16-byte vectors. For each state index n the lane scans its K steps from a zero
// state, keeping the local states hl_k and the decay products cum_k; a 5-step shuffle scan composes
// the lanes' affine maps h -> cum_K h + hl_K, which gives the state h_in entering every lane; then
// h_k = hl_k + cum_k h_in for all k at once (no second serial pass). The state leaving the warp's
// tokens is carried to the next iteration in shared memory: no length limit, and no
// [batch, dim, seqlen, dstate] tensor is stored. For the backward the forward saves the state
// entering every kChunk (128) tokens.
#include "scan_common.cuh"

namespace hzoo {
namespace {
using namespace detail;

constexpr int kMaxWarps = 8;

// One warp's 32*K tokens for every state index n: adds sum_n C_n h_n to y and advances carry.
// kVec: B and C rows are whole and 16-byte aligned (decided once per chunk, not per n).
template <typename bc_t, int K, bool kVec, bool kSeqIdx>
__device__ __forceinline__ void scan_states(const LaneRows<bc_t, K>& Brows, const LaneRows<bc_t, K>& Crows,
                                            const LaneTokens<K>& lt, const float (&dtu)[K], const float* A2,
                                            float* carry, float* saved, int N, int valid, int lane, float (&y)[K]) {
  const bc_t* pB = Brows.base;
  const bc_t* pC = Crows.base;
  for (int n = 0; n < N; ++n, pB += Brows.stride_n, pC += Crows.stride_n) {
    float Bv[K], Cv[K], hl[K], cum[K];
    if constexpr (kVec) {
      load_tokens_vec<bc_t, K>(pB, Bv);
      load_tokens_vec<bc_t, K>(pC, Cv);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        Bv[k] = k < valid ? to_float(pB[k]) : 0.f;
        Cv[k] = k < valid ? to_float(pC[k]) : 0.f;
      }
    }
    const float an = A2[n];
    // the lane's K steps from a zero state: local states hl and decay products cum
    float a = 1.f, h = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float dA = fast_exp2(kSeqIdx ? fmaf(lt.dt[k], an, lt.reset[k]) : lt.dt[k] * an);
      h = fmaf(dA, h, dtu[k] * Bv[k]);
      a *= dA;
      hl[k] = h;
      cum[k] = a;
    }
    // compose the lanes' maps h -> a h + h_loc, earlier lanes first
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const float ap = __shfl_up_sync(0xffffffffu, a, off);
      const float hp = __shfl_up_sync(0xffffffffu, h, off);
      if (lane >= off) {
        h = fmaf(a, hp, h);
        a *= ap;
      }
    }
    float a_before = __shfl_up_sync(0xffffffffu, a, 1);
    float h_before = __shfl_up_sync(0xffffffffu, h, 1);
    if (lane == 0) { a_before = 1.f; h_before = 0.f; }
    const float c0 = carry[n];
    const float h_in = fmaf(a_before, c0, h_before);     // the state entering this lane's first token
    if (saved != nullptr) saved[n] = h_in;
#pragma unroll
    for (int k = 0; k < K; ++k) y[k] = fmaf(Cv[k], fmaf(cum[k], h_in, hl[k]), y[k]);
    const float leaving = __shfl_sync(0xffffffffu, fmaf(a, c0, h), 31);
    __syncwarp();
    if (lane == 0) carry[n] = leaving;
    __syncwarp();
  }
}

// kMinBlocks > 1 (with 4-warp blocks) caps registers so that more warps share a multiprocessor
template <typename in_t, typename bc_t, int K, int kMinBlocks, bool kSeqIdx>
__global__ void __launch_bounds__(kMinBlocks > 1 ? 128 : kMaxWarps * 32, kMinBlocks)
scan_forward_kernel(const ScanParams p) {
  extern __shared__ float smem[];
  constexpr int kTokens = 32 * K;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int blocks_per_batch = (p.dim + warps - 1) / warps;
  const int b = blockIdx.x / blocks_per_batch;
  const int d = (blockIdx.x % blocks_per_batch) * warps + warp;
  if (d >= p.dim) return;                       // whole warp; there are no block-wide barriers
  const int N = p.dstate, L = p.seqlen;
  const int g = d / p.dim_per_group;
  const int64_t bd = static_cast<int64_t>(b) * p.dim + d;
  float* carry = smem + warp * N;               // the state entering the current 32*K tokens
  float* A2 = smem + (warps + warp) * N;        // A[d, :] * log2(e), for exp2
  for (int n = lane; n < N; n += 32) {
    carry[n] = p.initial_state != nullptr ? p.initial_state[bd * N + n] : 0.f;
    A2[n] = p.A[static_cast<int64_t>(d) * N + n] * kLog2e;
  }
  __syncwarp();
  const float Dd = p.D != nullptr ? p.D[d] : 0.f;

  for (int base = 0; base < L; base += kTokens) {
    const int t0 = base + lane * K;
    const int valid = L - t0;
    // this lane's first token starts a saved 256-token chunk
    const bool saves = p.chunk_states != nullptr && t0 % kChunk == 0 && valid > 0;
    float* saved = saves ? p.chunk_states + (bd * p.nchunks + t0 / kChunk) * N : nullptr;
    LaneTokens<K> lt;
    load_lane_tokens<in_t, K, kSeqIdx>(p, b, d, t0, valid, lt);
    const LaneRows<bc_t, K> Brows(p.B, p.B_sb, p.B_sg, p.B_sn, b, g, t0, valid);
    const LaneRows<bc_t, K> Crows(p.C, p.C_sb, p.C_sg, p.C_sn, b, g, t0, valid);
    float dtu[K], y[K];
#pragma unroll
    for (int k = 0; k < K; ++k) { dtu[k] = lt.dt[k] * lt.u[k]; y[k] = 0.f; }

    if (Brows.vec && Crows.vec)
      scan_states<bc_t, K, true, kSeqIdx>(Brows, Crows, lt, dtu, A2, carry, saves ? saved : nullptr, N, valid, lane, y);
    else
      scan_states<bc_t, K, false, kSeqIdx>(Brows, Crows, lt, dtu, A2, carry, saves ? saved : nullptr, N, valid, lane, y);

    float gate[K];
    if (p.z != nullptr) {
      load_tokens<in_t, K>(static_cast<const in_t*>(p.z) + b * p.z_sb + d * p.z_sd + t0, valid, gate);
#pragma unroll
      for (int k = 0; k < K; ++k) gate[k] = gate[k] * sigmoidf(gate[k]);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) gate[k] = 1.f;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) y[k] = (y[k] + Dd * lt.u[k]) * gate[k];
    store_tokens<in_t, K>(static_cast<in_t*>(p.out) + b * p.out_sb + d * p.out_sd + t0, valid, y);
  }
  if (p.last_state != nullptr)
    for (int n = lane; n < N; n += 32) p.last_state[bd * N + n] = carry[n];
}

template <typename in_t, typename bc_t>
struct ForwardLaunch {
  template <int K, int kMinBlocks = 1>
  static void go(const ScanParams& p, cudaStream_t stream) {
    const int warps = kMinBlocks > 1 ? 4 : p.forward_warps;
    const int blocks = p.batch * ((p.dim + warps - 1) / warps);
    const size_t smem = sizeof(float) * 2 * warps * p.dstate;
    if (p.seq_idx != nullptr)
      scan_forward_kernel<in_t, bc_t, K, kMinBlocks, true><<<blocks, warps * 32, smem, stream>>>(p);
    else
      scan_forward_kernel<in_t, bc_t, K, kMinBlocks, false><<<blocks, warps * 32, smem, stream>>>(p);
  }
  static void run(const ScanParams& p, cudaStream_t stream) {
    // variants (benchmarks/selective_scan.py times them), tokens per lane and register cap:
    // 0: 8; 1: 16; 2: 16 capped at 128 registers (4 blocks of 4 warps per multiprocessor);
    // 3: 8 capped at 80 (6 blocks); 4: 16 capped at 168 (3 blocks)
    switch (p.forward_variant) {
      case 0: go<8>(p, stream); break;
      case 1: go<16>(p, stream); break;
      case 3: go<8, 6>(p, stream); break;
      case 4: go<16, 3>(p, stream); break;
      default: go<16, 4>(p, stream); break;
    }
  }
};

}  // namespace

int chunk_count(int seqlen) { return (seqlen + kChunk - 1) / kChunk; }

void launch_forward(const ScanParams& p, cudaStream_t stream) { dispatch_dtypes<ForwardLaunch>(p, stream); }

}  // namespace hzoo
