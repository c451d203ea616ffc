// Selective scan (Mamba-1) backward, one warp per (batch, channel), chunks of kChunk tokens in reverse.
//
// Per chunk and state index n the warp recomputes the forward states from the state the forward
// saved at the chunk's start (the same lane-map shuffle scan as forward.cu), then runs the adjoint
// recurrence
//   g_t = dy_t C_{n,t} + exp(dt_{t+1} A_n) g_{t+1}       (g = dLoss/dh_t, dy = dout silu(z))
// with the mirrored (suffix) shuffle scan, carrying g across chunks in shared memory; the last
// state's gradient enters as g after the last token. From h_{t-1}, h_t and g_t every gradient is
// local: dB = g dt u, dC = dy h, ddt = g (A exp(dt A) h_{t-1} + B u), du = g dt B + D dy, dA = sum g
// dt exp(dt A) h_{t-1}. dB and dC sum over the channels of a group: the warps of a block (channels
// of one group) reduce in shared memory first and add once per block, atomically, or in
// deterministic mode write one slice per block that the caller sums in a fixed order. dA, dD and
// d(delta_bias) are per (batch, channel) partial sums written by one warp each (no atomics) and
// summed over the batch by the caller.
#include "scan_common.cuh"

namespace hzoo {
namespace {
using namespace detail;

constexpr int kK = kTokensPerLane;
constexpr int kTileN = 16;          // state indices per shared-memory atomic tile

// kMinBlocks > 1 caps registers so that more blocks share a multiprocessor (a tuning variant)
template <typename in_t, typename bc_t, int kMinBlocks, bool kSmemAtomics>
__global__ void __launch_bounds__(256, kMinBlocks)
scan_backward_kernel(const ScanParams p) {
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
  float* gcarry = smem + warp * N;              // dLoss/dh entering from the right, times its decay
  float* red = smem + warps * N;                // deterministic: [warps][2][kChunk]; else the atomic tile
  float* my_red = red + warp * 2 * kChunk;
  for (int n = lane; n < N; n += 32) gcarry[n] = p.dlast_state != nullptr ? p.dlast_state[bd * N + n] : 0.f;
  if constexpr (kSmemAtomics) {
    for (int i = threadIdx.x; i < 2 * kTileN * kChunk; i += blockDim.x) red[i] = 0.f;  // flushes re-zero it
    __syncthreads();
  }
  __syncwarp();
  const float Dd = p.D != nullptr ? p.D[d] : 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;

  for (int c = p.nchunks - 1; c >= 0; --c) {
    const int t0 = c * kChunk + lane * kK;
    const int valid = L - t0;
    LaneTokens<kK> lt;
    load_lane_tokens<in_t, kK>(p, b, d, t0, valid, lt);
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

    for (int n = 0; n < N; ++n) {
      const float An = p.A[static_cast<int64_t>(d) * N + n];
      const float A2 = An * kLog2e;
      float Bv[kK], Cv[kK], dA[kK], hs[kK];
      load_tokens<bc_t, kK>(bc_row<bc_t>(p.B, p.B_sb, p.B_sg, p.B_sn, b, g, n, t0), valid, Bv);
      load_tokens<bc_t, kK>(bc_row<bc_t>(p.C, p.C_sb, p.C_sg, p.C_sn, b, g, n, t0), valid, Cv);
      // forward states of this chunk, recomputed from the saved chunk-entry state
      float a = 1.f, h_loc = 0.f;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        dA[k] = (lt.reset_mask >> k) & 1u ? 0.f : fast_exp2(lt.dt[k] * A2);
        h_loc = dA[k] * h_loc + lt.dt[k] * lt.u[k] * Bv[k];
        a *= dA[k];
      }
      warp_prefix_compose(a, h_loc, lane);
      float a_before = __shfl_up_sync(0xffffffffu, a, 1);
      float h_before = __shfl_up_sync(0xffffffffu, h_loc, 1);
      if (lane == 0) { a_before = 1.f; h_before = 0.f; }
      const float h_enter = a_before * p.chunk_states[(bd * p.nchunks + c) * N + n] + h_before;
      float h = h_enter;
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        h = dA[k] * h + lt.dt[k] * lt.u[k] * Bv[k];
        hs[k] = h;
        y[k] += Cv[k] * h;
      }
      // adjoint: the lane's 8 reverse steps as one map R -> alpha R + beta, R = what enters from
      // the right (the next token's decay times its g); the map's output is what leaves to the left
      float alpha = 1.f, beta = 0.f;
#pragma unroll
      for (int k = kK - 1; k >= 0; --k) {
        beta = dA[k] * (beta + dy[k] * Cv[k]);
        alpha = dA[k] * alpha;
      }
      warp_suffix_compose(alpha, beta, lane);
      float alpha_after = __shfl_down_sync(0xffffffffu, alpha, 1);
      float beta_after = __shfl_down_sync(0xffffffffu, beta, 1);
      if (lane == 31) { alpha_after = 1.f; beta_after = 0.f; }
      const float G = gcarry[n];
      float from_right = alpha_after * G + beta_after;
      float dA_acc = 0.f;
      float dBv[kK], dCv[kK];
#pragma unroll
      for (int k = kK - 1; k >= 0; --k) {
        const float gk = dy[k] * Cv[k] + from_right;       // dLoss/dh_t
        const float h_prev = k > 0 ? hs[k - 1] : h_enter;
        const float decay_term = gk * dA[k] * h_prev;       // d/d(dt A) of the decay
        ddt[k] += decay_term * An + gk * Bv[k] * lt.u[k];
        dA_acc += decay_term * lt.dt[k];
        du[k] += gk * lt.dt[k] * Bv[k];
        dBv[k] = gk * lt.dt[k] * lt.u[k];
        dCv[k] = dy[k] * hs[k];
        from_right = dA[k] * gk;
      }
      const float leaving = __shfl_sync(0xffffffffu, alpha * G + beta, 0);
      dA_acc = warp_sum(dA_acc);
      if (lane == 0) p.dA_part[bd * N + n] += dA_acc;
      __syncwarp();
      if (lane == 0) gcarry[n] = leaving;
      // dB, dC sum over the block's channels (one group) before one global add per token
      if constexpr (kSmemAtomics) {
        // shared-memory atomics into a [2][kTileN][kK][32] tile (lane-minor: no bank conflicts),
        // flushed every kTileN state indices: two barriers per tile instead of two per state index
        const int nt = n % kTileN;
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          atomicAdd(red + ((0 * kTileN + nt) * kK + k) * 32 + lane, dBv[k]);
          atomicAdd(red + ((1 * kTileN + nt) * kK + k) * 32 + lane, dCv[k]);
        }
        if (nt == kTileN - 1 || n == N - 1) {
          __syncthreads();
          const int n_first = n - nt;
          for (int i = threadIdx.x; i < 2 * kTileN * kChunk; i += blockDim.x) {
            const int tt = i % kChunk, rest = i / kChunk;
            const int jn = rest % kTileN, which = rest / kTileN;
            float* slot = red + ((which * kTileN + jn) * kK + tt % kK) * 32 + tt / kK;
            const float s = *slot;
            *slot = 0.f;
            const int t = c * kChunk + tt;
            if (t < L && jn <= nt) {
              const int64_t idx = (((static_cast<int64_t>(which) * p.batch + b) * p.ngroups + g) * N + n_first + jn) * L + t;
              if (p.bc_atomic) atomicAdd(p.dBC + idx, s);
              else p.dBC[idx] = s;
            }
          }
          __syncthreads();
        }
      } else {
        // deterministic: every warp writes its own row, then a fixed-order sum over the warps
#pragma unroll
        for (int k = 0; k < kK; k += 4) {
          reinterpret_cast<float4*>(my_red)[(lane * kK + k) / 4] = make_float4(dBv[k], dBv[k + 1], dBv[k + 2], dBv[k + 3]);
          reinterpret_cast<float4*>(my_red + kChunk)[(lane * kK + k) / 4] = make_float4(dCv[k], dCv[k + 1], dCv[k + 2], dCv[k + 3]);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < 2 * kChunk; i += blockDim.x) {
          const int t = c * kChunk + (i % kChunk);
          if (t < L) {
            float s = 0.f;
            for (int w = 0; w < warps; ++w) s += red[w * 2 * kChunk + i];
            const int which = i / kChunk;
            const int64_t idx = ((((static_cast<int64_t>(which) * p.batch + b) * p.ngroups + g) * p.bc_slices + slice) * N + n) * L + t;
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
  if (p.dinitial_state != nullptr)
    for (int n = lane; n < N; n += 32) p.dinitial_state[bd * N + n] = gcarry[n];
}


template <typename in_t, typename bc_t>
struct BackwardLaunch {
  template <int kMinBlocks, bool kSmemAtomics>
  static void go(const ScanParams& p, int warps, cudaStream_t stream) {
    const int blocks = p.batch * (p.dim / warps);
    const int red = kSmemAtomics ? 2 * kTileN * kChunk : warps * 2 * kChunk;
    const size_t smem = sizeof(float) * (warps * p.dstate + red);
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(scan_backward_kernel<in_t, bc_t, kMinBlocks, kSmemAtomics>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    scan_backward_kernel<in_t, bc_t, kMinBlocks, kSmemAtomics><<<blocks, warps * 32, smem, stream>>>(p);
  }
  static void run(const ScanParams& p, cudaStream_t stream) {
    const int warps = backward_warps_per_block(p.dim_per_group);
    // the atomic tile is zeroed once here and re-zeroed by every flush
    const bool smem_atomics = p.backward_smem_atomics && p.bc_slices == 1;
    if (smem_atomics) {
      if (p.backward_min_blocks >= 2) go<2, true>(p, warps, stream); else go<1, true>(p, warps, stream);
    } else {
      if (p.backward_min_blocks >= 2) go<2, false>(p, warps, stream); else go<1, false>(p, warps, stream);
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
