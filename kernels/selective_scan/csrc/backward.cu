// Selective scan (Mamba-1) backward, one warp per (batch, channel), 32 K tokens at a time in reverse.
//
// Per chunk and state index n the warp recomputes the forward states from the state the forward
// saved at the chunk's start (the same lane-map shuffle scan as forward.cu), then runs the adjoint
// recurrence
//   g_t = dy_t C_{n,t} + exp(dt_{t+1} A_n) g_{t+1}       (g = dLoss/dh_t, dy = dout silu(z))
// with the mirrored (suffix) shuffle scan, carrying g across chunks in shared memory; the last
// state's gradient enters as g after the last token. From h_{t-1}, h_t and g_t every gradient is
// local: dB = g dt u, dC = dy h, ddt = g (A exp(dt A) h_{t-1} + B u), du = g dt B + D dy, dA = sum g
// dt exp(dt A) h_{t-1}. The loop keeps s = sum_n g B per token (du = s dt + D dy, the input part of
// ddt = s u) and the decay part reuses g exp(dt A), the adjoint handed to the previous token.
// dB and dC sum over the channels of a group: the warps of a block (channels of one group) stage
// their rows in shared memory, the block sums them in a fixed order every kTileN state indices and
// adds once per block to global memory, 16 bytes at a time, atomically, or in deterministic mode
// into its own slice that the caller sums in a fixed order. dA, dD and d(delta_bias) are per
// (batch, channel) partial sums written by one warp each (no atomics) and summed over the batch by
// the caller.
//
// Registers decide the speed (NOTES.md): at 128 per thread (2 blocks of 8 warps per multiprocessor)
// the state loop must not spill. Hence: the document-reset array exists only in the seq_idx
// instantiation; d dt/d delta, u and the dz factor are recomputed after the state loop from
// reloaded rows instead of staying live; B/C loads are 16-byte vectors in a loop instantiated
// apart from the scalar one (no per-index branch); the prefix scan, the suffix scan and the
// previous index's dA warp sum are independent shuffle chains the scheduler may overlap.
#include "scan_common.cuh"

namespace hzoo {
namespace {
using namespace detail;

constexpr int kTileN = 4;           // state indices per block-wide dB/dC reduction (2 barriers each)

// dB/dC staging: one warp's row of kTok floats as float4 slots, lane l owning slots
// l*kK/4 .. (l+1)*kK/4 - 1 (its tokens, in order). Slot s lives at s ^ ((s >> 3) & (kK/4 - 1)): the
// 8 lanes of a quarter-warp then store to 8 distinct 16-byte bank groups, and a reader's 8
// consecutive slots are a permutation of one aligned group of 8 (both conflict-free).
template <int kK>
__device__ __forceinline__ int red_slot(int s) { return s ^ ((s >> 3) & (kK / 4 - 1)); }

__device__ __forceinline__ void add_or_store4(float* dst, float4 v, bool atomic) {
  if (atomic) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(dst), v);    // one 16-byte reduction (sm_90)
#else
    atomicAdd(dst, v.x); atomicAdd(dst + 1, v.y); atomicAdd(dst + 2, v.z); atomicAdd(dst + 3, v.w);
#endif
  } else {
    *reinterpret_cast<float4*>(dst) = v;
  }
}

// K tokens per lane (32 K per warp step); kMinBlocks caps registers; kSeqIdx: seq_idx is given.
template <typename in_t, typename bc_t, int kK, int kMinBlocks, bool kSeqIdx>
__global__ void __launch_bounds__(256, kMinBlocks)
scan_backward_kernel(const ScanParams p) {
  static_assert(kK % 4 == 0, "a lane stages whole float4 slots");
  constexpr int kTok = 32 * kK;                 // tokens per warp step; a multiple of kChunk's divisor
  constexpr int kSlots = kTok / 4;
  constexpr unsigned kAll = 0xffffffffu;
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
  // sums; then the block's dB/dC tile [kTileN][warps][2][kSlots] float4
  float* gcarry = smem + (0 * warps + warp) * N;
  float* h_chunk = smem + (1 * warps + warp) * N;
  float* A_s = smem + (2 * warps + warp) * N;
  float* dA_s = smem + (3 * warps + warp) * N;
  float4* red = reinterpret_cast<float4*>(smem + 4 * warps * N);
  for (int n = lane; n < N; n += 32) {
    gcarry[n] = p.dlast_state != nullptr ? p.dlast_state[bd * N + n] : 0.f;
    A_s[n] = p.A[static_cast<int64_t>(d) * N + n];
    dA_s[n] = 0.f;
  }
  __syncwarp();
  const float Dd = p.D != nullptr ? p.D[d] : 0.f;
  const float bias = p.delta_bias != nullptr ? p.delta_bias[d] : 0.f;
  const in_t* u_row = static_cast<const in_t*>(p.u) + b * p.u_sb + d * p.u_sd;
  const in_t* delta_row = static_cast<const in_t*>(p.delta) + b * p.delta_sb + d * p.delta_sd;
  const in_t* dout_row = static_cast<const in_t*>(p.dout) + b * p.dout_sb + d * p.dout_sd;
  const bool vec_bc = L % 4 == 0;               // dB/dC rows take 16-byte adds
  float dD_acc = 0.f, dbias_acc = 0.f;

  const int steps = (L + kTok - 1) / kTok;
  for (int c = steps - 1; c >= 0; --c) {
    const int t0 = c * kTok + lane * kK;
    const int valid = L - t0;
    for (int n = lane; n < N; n += 32) h_chunk[n] = p.chunk_states[(bd * p.nchunks + c * (kTok / kChunk)) * N + n];
    float dt[kK], dtu[kK], dy[kK], reset[kK];
    {
      float u[kK], raw[kK], dout[kK];
      load_tokens<in_t, kK>(u_row + t0, valid, u);
      load_tokens<in_t, kK>(delta_row + t0, valid, raw);
      load_tokens<in_t, kK>(dout_row + t0, valid, dout);
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        dt[k] = k < valid ? delta_to_dt(raw[k] + bias, p.delta_softplus) : 0.f;   // padding: decay 1
        dtu[k] = dt[k] * u[k];
      }
      if (p.z != nullptr) {
        float zv[kK];
        load_tokens<in_t, kK>(static_cast<const in_t*>(p.z) + b * p.z_sb + d * p.z_sd + t0, valid, zv);
#pragma unroll
        for (int k = 0; k < kK; ++k) dy[k] = dout[k] * zv[k] * sigmoidf(zv[k]);
      } else {
#pragma unroll
        for (int k = 0; k < kK; ++k) dy[k] = dout[k];
      }
    }
    if constexpr (kSeqIdx) load_resets<kK>(p, b, t0, valid, reset);
    const LaneRows<bc_t, kK> Brows(p.B, p.B_sb, p.B_sg, p.B_sn, b, g, t0, valid);
    const LaneRows<bc_t, kK> Crows(p.C, p.C_sb, p.C_sg, p.C_sn, b, g, t0, valid);
    float sgB[kK], ddt_dec[kK], y[kK];   // sum_n g B; sum_n A g exp(dt A) h_prev; sum_n C h
#pragma unroll
    for (int k = 0; k < kK; ++k) { sgB[k] = 0.f; ddt_dec[k] = 0.f; y[k] = 0.f; }
    float dA_pending = 0.f;                     // the previous state index's dA, summed over lanes here
    __syncwarp();

    // the state loop, instantiated for 16-byte B/C loads and for the scalar path; the choice is
    // uniform over the block (same batch, group and step: a whole aligned step or not), as the
    // barriers inside need
    auto state_loop = [&](auto vec_tag) {
      constexpr bool kVecBC = decltype(vec_tag)::value;
      const bc_t* pB = Brows.base;
      const bc_t* pC = Crows.base;
      for (int n = 0; n < N; ++n, pB += Brows.stride_n, pC += Crows.stride_n) {
        const float An = A_s[n];
        const float A2 = An * kLog2e;
        float Bv[kK], Cv[kK], dA[kK], hs[kK];
        if constexpr (kVecBC) {
          load_tokens_vec<bc_t, kK>(pB, Bv);
          load_tokens_vec<bc_t, kK>(pC, Cv);
        } else {
#pragma unroll
          for (int k = 0; k < kK; ++k) {
            Bv[k] = k < valid ? to_float(pB[k]) : 0.f;
            Cv[k] = k < valid ? to_float(pC[k]) : 0.f;
          }
        }
        // the lane's K forward steps as h -> af h + hf, and its K adjoint steps (right to left) as
        // R -> ab R + bb, where R is the next token's decay times its g
        float af = 1.f, hf = 0.f;
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          dA[k] = fast_exp2(kSeqIdx ? fmaf(dt[k], A2, reset[k]) : dt[k] * A2);
          hf = fmaf(dA[k], hf, dtu[k] * Bv[k]);
          af *= dA[k];
        }
        float ab = af, bb = 0.f;
#pragma unroll
        for (int k = kK - 1; k >= 0; --k) bb = dA[k] * fmaf(dy[k], Cv[k], bb);
        // three independent shuffle chains, interleaved: prefix (earlier lanes first), suffix (later
        // lanes first), and the butterfly sum of the previous index's dA
#pragma unroll
        for (int j = 0; j < 5; ++j) {
          const int off = 1 << j;
          const float ap = __shfl_up_sync(kAll, af, off);
          const float hp = __shfl_up_sync(kAll, hf, off);
          const float an = __shfl_down_sync(kAll, ab, off);
          const float bn = __shfl_down_sync(kAll, bb, off);
          dA_pending += __shfl_xor_sync(kAll, dA_pending, 16 >> j);
          if (lane >= off) {
            hf = fmaf(af, hp, hf);
            af *= ap;
          }
          if (lane + off < 32) {
            bb = fmaf(ab, bn, bb);
            ab *= an;
          }
        }
        if (lane == 0 && n > 0) dA_s[n - 1] += dA_pending;
        float a_before = __shfl_up_sync(kAll, af, 1);
        float h_before = __shfl_up_sync(kAll, hf, 1);
        float alpha_after = __shfl_down_sync(kAll, ab, 1);
        float beta_after = __shfl_down_sync(kAll, bb, 1);
        const float G = gcarry[n];
        const float leaving = __shfl_sync(kAll, fmaf(ab, G, bb), 0);   // g passed left of the step
        if (lane == 0) { a_before = 1.f; h_before = 0.f; }
        if (lane == 31) { alpha_after = 1.f; beta_after = 0.f; }
        const float h_enter = fmaf(a_before, h_chunk[n], h_before);
        float from_right = fmaf(alpha_after, G, beta_after);

        float4* row_b = red + ((n % kTileN) * warps + warp) * 2 * kSlots;   // this warp's dB row
        float4* row_c = row_b + kSlots;                                      // and dC row
        float h = h_enter;
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          h = fmaf(dA[k], h, dtu[k] * Bv[k]);
          hs[k] = h;
          y[k] = fmaf(Cv[k], h, y[k]);
        }
#pragma unroll
        for (int j = 0; j < kK / 4; ++j)
          row_c[red_slot<kK>(lane * (kK / 4) + j)] =
              make_float4(dy[4 * j] * hs[4 * j], dy[4 * j + 1] * hs[4 * j + 1], dy[4 * j + 2] * hs[4 * j + 2],
                          dy[4 * j + 3] * hs[4 * j + 3]);
        float dA_acc = 0.f, part[4];
#pragma unroll
        for (int k = kK - 1; k >= 0; --k) {
          const float gk = fmaf(dy[k], Cv[k], from_right);    // dLoss/dh_t
          const float fr = dA[k] * gk;                         // what token t passes to t-1
          const float dec = fr * (k > 0 ? hs[k - 1] : h_enter);  // g_t d h_t / d(dt_t A_n)
          ddt_dec[k] = fmaf(dec, An, ddt_dec[k]);
          dA_acc = fmaf(dec, dt[k], dA_acc);
          sgB[k] = fmaf(gk, Bv[k], sgB[k]);
          part[k % 4] = gk * dtu[k];                           // dB contribution
          if (k % 4 == 0)
            row_b[red_slot<kK>(lane * (kK / 4) + k / 4)] = make_float4(part[0], part[1], part[2], part[3]);
          from_right = fr;
        }
        dA_pending = dA_acc;
        __syncwarp();
        if (lane == 0) gcarry[n] = leaving;
        // every kTileN state indices: the block sums its warps' dB/dC rows in a fixed order and adds
        // them to global memory once, 4 tokens at a time
        const int nt = n % kTileN;
        if (nt == kTileN - 1 || n == N - 1) {
          __syncthreads();
          const int n_first = n - nt;
          for (int i = threadIdx.x; i < (nt + 1) * 2 * kSlots; i += blockDim.x) {
            const int sl = i % kSlots, which = (i / kSlots) % 2, jn = i / (2 * kSlots);
            const float4* src = red + (jn * warps * 2 + which) * kSlots + red_slot<kK>(sl);
            float4 acc = src[0];
#pragma unroll 4
            for (int w = 1; w < warps; ++w) {
              const float4 v = src[w * 2 * kSlots];
              acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
            }
            const int t = c * kTok + sl * 4;
            if (t < L) {
              const int64_t row = ((static_cast<int64_t>(which) * p.batch + b) * p.ngroups + g) * p.bc_slices + slice;
              float* dst = p.dBC + (row * N + n_first + jn) * L + t;
              if (vec_bc) {
                add_or_store4(dst, acc, p.bc_atomic);
              } else {
                const float parts[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
                for (int j = 0; j < 4; ++j)
                  if (t + j < L) {
                    if (p.bc_atomic) atomicAdd(dst + j, parts[j]);
                    else dst[j] = parts[j];
                  }
              }
            }
          }
          __syncthreads();
        }
      }
    };
    if ((c + 1) * kTok <= L && Brows.vec && Crows.vec) state_loop(std::true_type{});
    else state_loop(std::false_type{});
    const float dA_last = warp_sum(dA_pending);
    if (lane == 0) dA_s[N - 1] += dA_last;

    // per-token gradients, from rows reloaded (L1/L2 hits) rather than kept live through the loop
    {
      float u[kK], raw[kK], dout[kK], du[kK], ddelta[kK];
      load_tokens<in_t, kK>(u_row + t0, valid, u);
      load_tokens<in_t, kK>(delta_row + t0, valid, raw);
      load_tokens<in_t, kK>(dout_row + t0, valid, dout);
#pragma unroll
      for (int k = 0; k < kK; ++k) {
        const bool in_range = k < valid;
        du[k] = fmaf(sgB[k], dt[k], Dd * dy[k]);
        ddelta[k] = in_range ? fmaf(sgB[k], u[k], ddt_dec[k]) * dt_derivative(raw[k] + bias, p.delta_softplus) : 0.f;
        dD_acc += in_range ? dy[k] * u[k] : 0.f;
        dbias_acc += ddelta[k];
      }
      const int64_t row = bd * L + t0;
      store_tokens<in_t, kK>(static_cast<in_t*>(p.du) + row, valid, du);
      store_tokens<in_t, kK>(static_cast<in_t*>(p.ddelta) + row, valid, ddelta);
      if (p.z != nullptr) {
        float zv[kK];
        load_tokens<in_t, kK>(static_cast<const in_t*>(p.z) + b * p.z_sb + d * p.z_sd + t0, valid, zv);
#pragma unroll
        for (int k = 0; k < kK; ++k) {
          const float sg = sigmoidf(zv[k]);
          y[k] = dout[k] * sg * (1.f + zv[k] * (1.f - sg)) * (y[k] + Dd * u[k]);   // dz
        }
        store_tokens<in_t, kK>(static_cast<in_t*>(p.dz) + row, valid, y);
      }
    }
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
  template <typename Kernel>
  static void launch(Kernel kernel, const ScanParams& p, int warps, int kK, cudaStream_t stream) {
    const int blocks = p.batch * (p.dim / warps);
    const size_t smem = sizeof(float) * (4 * warps * p.dstate + kTileN * warps * 2 * 32 * kK);
    if (smem > 48 * 1024)
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    kernel<<<blocks, warps * 32, smem, stream>>>(p);
  }
  template <int kK, int kMinBlocks>
  static void go(const ScanParams& p, int warps, cudaStream_t stream) {
    if (p.seq_idx != nullptr) launch(scan_backward_kernel<in_t, bc_t, kK, kMinBlocks, true>, p, warps, kK, stream);
    else launch(scan_backward_kernel<in_t, bc_t, kK, kMinBlocks, false>, p, warps, kK, stream);
  }
  static void run(const ScanParams& p, cudaStream_t stream) {
    const int warps = backward_warps_per_block(p.dim_per_group);
    // variants (benchmarks/selective_scan.py times them), tokens per lane / blocks per multiprocessor:
    // 0: 8 / 2 (128 registers, no spills in the state loop); 1: 4 / 3 (80 registers). Measured and
    // dropped (NOTES.md): 8 / 3 (80 registers, spills in the loop) and 4 / 4 (64 registers).
    switch (p.backward_variant) {
      case 1: go<4, 3>(p, warps, stream); break;
      default: go<8, 2>(p, warps, stream); break;
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
