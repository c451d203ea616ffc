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
// entering every kChunk (256) tokens. NP state indices are processed together so that their
// shuffle chains overlap.
#include "scan_common.cuh"

namespace hzoo {
namespace {
using namespace detail;

constexpr int kMaxWarps = 8;

// kMinBlocks > 1 (with 4-warp blocks) caps registers so that more warps share a multiprocessor
template <typename in_t, typename bc_t, int K, int NP, int kMinBlocks>
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
  for (int n = lane; n < N; n += 32) carry[n] = p.initial_state != nullptr ? p.initial_state[bd * N + n] : 0.f;
  __syncwarp();
  const float Dd = p.D != nullptr ? p.D[d] : 0.f;
  const float* A = p.A + static_cast<int64_t>(d) * N;

  for (int base = 0; base < L; base += kTokens) {
    const int t0 = base + lane * K;
    const int valid = L - t0;
    // this lane's first token starts a saved 256-token chunk
    const bool saves = p.chunk_states != nullptr && t0 % kChunk == 0 && valid > 0;
    float* saved = saves ? p.chunk_states + (bd * p.nchunks + t0 / kChunk) * N : nullptr;
    LaneTokens<K> lt;
    load_lane_tokens<in_t, K>(p, b, d, t0, valid, lt);
    float dtu[K], y[K];
#pragma unroll
    for (int k = 0; k < K; ++k) { dtu[k] = lt.dt[k] * lt.u[k]; y[k] = 0.f; }

    for (int n0 = 0; n0 < N; n0 += NP) {
      float hl[NP][K], cum[NP][K], Cv[NP][K], a[NP], h[NP];
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const int n = n0 + j;
        const float A2 = A[n] * kLog2e;
        float Bv[K];
        load_tokens<bc_t, K>(bc_row<bc_t>(p.B, p.B_sb, p.B_sg, p.B_sn, b, g, n, t0), valid, Bv);
        load_tokens<bc_t, K>(bc_row<bc_t>(p.C, p.C_sb, p.C_sg, p.C_sn, b, g, n, t0), valid, Cv[j]);
        float acc = 1.f, hh = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const float dA = (lt.reset_mask >> k) & 1u ? 0.f : fast_exp2(lt.dt[k] * A2);
          hh = dA * hh + dtu[k] * Bv[k];
          acc *= dA;
          hl[j][k] = hh;
          cum[j][k] = acc;
        }
        a[j] = acc;
        h[j] = hh;
      }
      // compose the lanes' maps; the NP chains are independent and interleave
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
#pragma unroll
        for (int j = 0; j < NP; ++j) {
          const float ap = __shfl_up_sync(0xffffffffu, a[j], off);
          const float hp = __shfl_up_sync(0xffffffffu, h[j], off);
          if (lane >= off) {
            h[j] = a[j] * hp + h[j];
            a[j] = a[j] * ap;
          }
        }
      }
      float leaving[NP];
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        float a_before = __shfl_up_sync(0xffffffffu, a[j], 1);
        float h_before = __shfl_up_sync(0xffffffffu, h[j], 1);
        if (lane == 0) { a_before = 1.f; h_before = 0.f; }
        const float c0 = carry[n0 + j];
        const float h_in = a_before * c0 + h_before;   // the state entering this lane's first token
        if (saves) saved[n0 + j] = h_in;
#pragma unroll
        for (int k = 0; k < K; ++k) y[k] += Cv[j][k] * (hl[j][k] + cum[j][k] * h_in);
        leaving[j] = __shfl_sync(0xffffffffu, a[j] * c0 + h[j], 31);
      }
      __syncwarp();
      if (lane == 0) {
#pragma unroll
        for (int j = 0; j < NP; ++j) carry[n0 + j] = leaving[j];
      }
      __syncwarp();
    }

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
  template <int K, int NP, int kMinBlocks = 1>
  static void go(const ScanParams& p, cudaStream_t stream) {
    const int warps = kMinBlocks > 1 ? 4 : p.forward_warps;
    const int blocks = p.batch * ((p.dim + warps - 1) / warps);
    const size_t smem = sizeof(float) * warps * p.dstate;
    scan_forward_kernel<in_t, bc_t, K, NP, kMinBlocks><<<blocks, warps * 32, smem, stream>>>(p);
  }
  static void run(const ScanParams& p, cudaStream_t stream) {
    // variants (benchmarks/selective_scan.py times them): 0: 8 tokens/lane, 1 state at a time;
    // 1: 8 tokens, 2 states interleaved (dstate even); 2: 16 tokens, 1 state; 3: as 0 with the
    // registers capped for 6 blocks of 4 warps per multiprocessor
    if (p.forward_variant == 1 && p.dstate % 2 == 0) go<8, 2>(p, stream);
    else if (p.forward_variant == 2) go<16, 1>(p, stream);
    else if (p.forward_variant == 3) go<8, 1, 6>(p, stream);
    else go<8, 1>(p, stream);
  }
};

}  // namespace

int chunk_count(int seqlen) { return (seqlen + kChunk - 1) / kChunk; }

void launch_forward(const ScanParams& p, cudaStream_t stream) { dispatch_dtypes<ForwardLaunch>(p, stream); }

}  // namespace hzoo
