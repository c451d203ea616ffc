// Selective scan (Mamba-1) backward, one warp per (batch, channel), 32 K tokens at a time in reverse.
//
// Per chunk and state index n the warp recomputes the forward states from the state the forward
// saved at the chunk's start (the same lane-map shuffle scan as forward.cu), then runs the adjoint
// recurrence
//   g_t = dy_t C_{n,t} + exp(dt_{t+1} A_n) g_{t+1}       (g = dLoss/dh_t, dy = dout silu(z))
// with the mirrored (suffix) shuffle scan, carrying g across chunks in shared memory; the last
// state's gradient enters as g after the last token. From h_{t-1}, h_t and g_t every gradient is
// local: dB = g dt u, dC = dy h, ddt = g (A exp(dt A) h_{t-1} + B u), du = g dt B + D dy, dA = sum g
// dt exp(dt A) h_{t-1}. dB and dC sum over the channels of a group: the warps of a block (channels
// of one group) write their rows to shared memory, the block sums them in a fixed order every
// kTileN state indices and adds once per block to global memory, atomically, or in deterministic
// mode into its own slice that the caller sums in a fixed order. dA, dD and
// d(delta_bias) are per (batch, channel) partial sums written by one warp each (no atomics) and
// summed over the batch by the caller.
#include "scan_common.cuh"

namespace hzoo {
namespace {
using namespace detail;

constexpr int kTileN = 4;           // state indices per block-wide dB/dC reduction (2 barriers each)

// kMinBlocks > 1 caps registers so that more blocks share a multiprocessor (a tuning variant)
// K tokens per lane (32 K per warp step); kMinBlocks > 1 caps registers so that more blocks share
// a multiprocessor. Both are tuning variants.
template <typename in_t, typename bc_t, int kK, int kMinBlocks>
__global__ void __launch_bounds__(256, kMinBlocks)
scan_backward_kernel(const ScanParams p) {
  constexpr int kTok = 32 * kK;                 // tokens per warp step; a multiple of kChunk's divisor
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;            // divides dim_per_group: all warps of one group
  const int blocks_per_batch = p.dim / warps;
  const int b = blockIdx.x / blocks_per_batch;
  const int d = (blockIdx.x % blocks_per_batch) * warps + warp;
  const int N = p.dstate, L = p.seqlen;
  const int g = d / p.dim_per_group;
  const int slice = p.bc_slices > 1 ? (d % p.dim_per_group) / warps : 0;
  const int64_t bd = static_cast<int64_t>(b) * p.dim + d;
  // shared memory: per warp [N] each of: g carried from the right, the chunk's entry state, A, dA
  // partial sums; then the block's dB/dC tile [kTileN][warps][2][kTok]
  float* gcarry = smem + (0 * warps + warp) * N;
  float* h_chunk = smem + (1 * warps + warp) * N;
  float* A_s = smem + (2 * warps + warp) * N;
  float* dA_s = smem + (3 * warps + warp) * N;
  float* red = smem + 4 * warps * N;
  for (int n = lane; n < N; n += 32) {
    gcarry[n] = p.dlast_state != nullptr ? p.dlast_state[bd * N + n] : 0.f;
    A_s[n] = p.A[static_cast<int64_t>(d) * N + n];
    dA_s[n] = 0.f;
  }
  __syncwarp();
  const float Dd = p.D != nullptr ? p.D[d] : 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;

  const int steps = (L + kTok - 1) / kTok;
  for (int c = steps - 1; c >= 0; --c) {
    const int t0 = c * kTok + lane * kK;
    const int valid = L - t0;
    // the forward saved the state entering every kChunk tokens; kTok is a multiple of kChunk
    for (int n = lane; n < N; n += 32) h_chunk[n] = p.chunk_states[(bd * p.nchunks + c * (kTok / kChunk)) * N + n];
    LaneTokens<kK> lt;
    load_lane_tokens<in_t, kK>(p, b, d, t0, valid, lt);
    const LaneRows<bc_t, kK> Brows(p.B, p.B_sb, p.B_sg, p.B_sn, b, g, t0, valid);
    const LaneRows<bc_t, kK> Crows(p.C, p.C_sb, p.C_sg, p.C_sn, b, g, t0, valid);
    float dout[kK], dy[kK], dz_factor[kK];
    load_tokens<in_t, kK>(static_cast<const in_t*>(p.dout) + b * p.dout_sb + d * p.dout_sd + t0, valid, dout);
    if (p.z != nullptr) {
      float zv[kK];
      load_tokens<in_t, kK>(static_cast<const in_t*>(p.z) + b * p.z_sb + d * p.z_sd + t0, valid, zv);
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        const float s = sigmoidf(zv[k]);
        dy[k] = dout[k] * zv[k] * s;
        dz_factor[k] = dout[k] * s * (1.f + zv[k] * (1.f - s));   // dout * silu'(z)
      }
    } else {
#pragma unroll
      for (int k = 0; k < kK; ++k) { dy[k] = dout[k]; dz_factor[k] = 0.f; }
    }
    float y[kK], du[kK], ddt[kK];
#pragma unroll
    for (int k = 0; k < kK; ++k) { y[k] = 0.f; du[k] = 0.f; ddt[k] = 0.f; }
    __syncwarp();

    for (int n = 0; n < N; ++n) {
      const float An = A_s[n];
      const float A2 = An * kLog2e;
      float Bv[kK], Cv[kK], dA[kK], hs[kK];
      Brows.load(n, valid, Bv);
      Crows.load(n, valid, Cv);
      // forward states of this chunk, recomputed from the saved chunk-entry state
      float a = 1.f, h_loc = 0.f;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        dA[k] = fast_exp2(fmaf(lt.dt[k], A2, lt.reset[k]));
        h_loc = fmaf(dA[k], h_loc, lt.dt[k] * lt.u[k] * Bv[k]);
        a *= dA[k];
      }
      warp_prefix_compose(a, h_loc, lane);
      float a_before = __shfl_up_sync(0xffffffffu, a, 1);
      float h_before = __shfl_up_sync(0xffffffffu, h_loc, 1);
      if (lane == 0) { a_before = 1.f; h_before = 0.f; }
      const float h_enter = fmaf(a_before, h_chunk[n], h_before);
      float h = h_enter;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        h = fmaf(dA[k], h, lt.dt[k] * lt.u[k] * Bv[k]);
        hs[k] = h;
        y[k] = fmaf(Cv[k], h, y[k]);
      }
      // adjoint: the lane's 8 reverse steps as one map R -> alpha R + beta, R = what enters from
      // the right (the next token's decay times its g); the map's output is what leaves to the left
      float alpha = 1.f, beta = 0.f;
#pragma unroll
      for (int k = kK - 1; k >= 0; --k) {
        beta = dA[k] * fmaf(dy[k], Cv[k], beta);
        alpha = dA[k] * alpha;
      }
      warp_suffix_compose(alpha, beta, lane);
      float alpha_after = __shfl_down_sync(0xffffffffu, alpha, 1);
      float beta_after = __shfl_down_sync(0xffffffffu, beta, 1);
      if (lane == 31) { alpha_after = 1.f; beta_after = 0.f; }
      const float G = gcarry[n];
      float from_right = fmaf(alpha_after, G, beta_after);
      float dA_acc = 0.f;
      float* slot = red + ((n % kTileN) * warps + warp) * 2 * kTok;   // this warp's dB, dC rows
#pragma unroll
      for (int k = kK - 1; k >= 0; --k) {
        const float gk = fmaf(dy[k], Cv[k], from_right);    // dLoss/dh_t
        const float h_prev = k > 0 ? hs[k - 1] : h_enter;
        const float decay_term = gk * dA[k] * h_prev;       // d/d(dt A) of the decay
        ddt[k] = fmaf(decay_term, An, fmaf(gk * Bv[k], lt.u[k], ddt[k]));
        dA_acc = fmaf(decay_term, lt.dt[k], dA_acc);
        du[k] = fmaf(gk * lt.dt[k], Bv[k], du[k]);
        // lane-minor layout [k][lane]: conflict-free stores
        slot[k * 32 + lane] = gk * lt.dt[k] * lt.u[k];
        slot[kTok + k * 32 + lane] = dy[k] * hs[k];
        from_right = dA[k] * gk;
      }
      const float leaving = __shfl_sync(0xffffffffu, fmaf(alpha, G, beta), 0);
      dA_acc = warp_sum(dA_acc);
      __syncwarp();
      if (lane == 0) {
        gcarry[n] = leaving;
        dA_s[n] += dA_acc;
      }
      // every kTileN state indices: the block sums its warps' dB/dC rows in a fixed order and adds
      // them to global memory once
      const int nt = n % kTileN;
      if (nt == kTileN - 1 || n == N - 1) {
        __syncthreads();
        const int n_first = n - nt;
        for (int i = threadIdx.x; i < (nt + 1) * 2 * kTok; i += blockDim.x) {
          const int tt = i % kTok, which = (i / kTok) % 2, jn = i / (2 * kTok);
          const int t = c * kTok + tt;
          if (t < L) {
            const float* src = red + (jn * warps) * 2 * kTok + which * kTok + (tt % kK) * 32 + tt / kK;
            float s = 0.f;
            for (int w = 0; w < warps; ++w) s += src[w * 2 * kTok];
            const int64_t idx = ((((static_cast<int64_t>(which) * p.batch + b) * p.ngroups + g) * p.bc_slices + slice) * N + n_first + jn) * L + t;
            if (p.bc_atomic) atomicAdd(p.dBC + idx, s);
            else p.dBC[idx] = s;
          }
        }
        __syncthreads();
      }
    }

    float ddelta[kK];
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      const bool in_range = k < valid;
      du[k] += Dd * dy[k];
      dD_acc += in_range ? dy[k] * lt.u[k] : 0.f;
      ddelta[k] = in_range ? ddt[k] * lt.dt_grad[k] : 0.f;
      dbias_acc += ddelta[k];
      y[k] = (y[k] + Dd * lt.u[k]) * dz_factor[k];           // dz
    }
    const int64_t row = bd * L + t0;
    store_tokens<in_t, kK>(static_cast<in_t*>(p.du) + row, valid, du);
    store_tokens<in_t, kK>(static_cast<in_t*>(p.ddelta) + row, valid, ddelta);
    if (p.z != nullptr) store_tokens<in_t, kK>(static_cast<in_t*>(p.dz) + row, valid, y);
  }
  dD_acc = warp_sum(dD_acc);
  dbias_acc = warp_sum(dbias_acc);
  if (lane == 0) {
    p.dD_part[bd] = dD_acc;
    p.dbias_part[bd] = dbias_acc;
  }
  __syncwarp();
  for (int n = lane; n < N; n += 32) {
    p.dA_part[bd * N + n] = dA_s[n];
    if (p.dinitial_state != nullptr) p.dinitial_state[bd * N + n] = gcarry[n];
  }
}

template <typename in_t, typename bc_t>
struct BackwardLaunch {
  template <int kK, int kMinBlocks>
  static void go(const ScanParams& p, int warps, cudaStream_t stream) {
    const int blocks = p.batch * (p.dim / warps);
    const size_t smem = sizeof(float) * (4 * warps * p.dstate + kTileN * warps * 2 * 32 * kK);
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(scan_backward_kernel<in_t, bc_t, kK, kMinBlocks>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    scan_backward_kernel<in_t, bc_t, kK, kMinBlocks><<<blocks, warps * 32, smem, stream>>>(p);
  }
  static void run(const ScanParams& p, cudaStream_t stream) {
    const int warps = backward_warps_per_block(p.dim_per_group);
    // variants (benchmarks/selective_scan.py times them): tokens per lane / blocks per multiprocessor
    switch (p.backward_variant) {
      case 0: go<8, 1>(p, warps, stream); break;
      case 1: go<8, 2>(p, warps, stream); break;
      case 2: go<4, 2>(p, warps, stream); break;
      default: go<4, 3>(p, warps, stream); break;
    }
  }
};

}  // namespace

int backward_warps_per_block(int dim_per_group) {
  for (int w = 8; w > 1; w >>= 1)
    if (dim_per_group % w == 0) return w;
  return 1;
}

void launch_backward(const ScanParams& p, cudaStream_t stream) { dispatch_dtypes<BackwardLaunch>(p, stream); }

}  // namespace hzoo
