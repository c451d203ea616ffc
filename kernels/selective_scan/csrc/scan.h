// Selective scan (Mamba-1) kernels: the parameter blocks shared by the launchers and the torch binding.
// Kept free of torch headers so the kernels compile (and CI compile-checks them) with nvcc alone.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace hzoo {

enum ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Shapes: u, delta, z, out [batch, dim, seqlen] (seqlen contiguous, other strides free);
// A [dim, dstate] fp32; B, C [batch, groups, dstate, seqlen] (seqlen contiguous);
// D, delta_bias [dim] fp32; initial_state, last_state [batch, dim, dstate] fp32 contiguous;
// seq_idx int32 [batch, seqlen] contiguous; chunk_states [batch, dim, nchunks, dstate] fp32
// (the state entering every kChunk tokens).
struct ScanParams {
  int batch, dim, seqlen, dstate, ngroups, dim_per_group, nchunks;
  int64_t u_sb, u_sd, delta_sb, delta_sd, z_sb, z_sd, out_sb, out_sd;
  int64_t B_sb, B_sg, B_sn, C_sb, C_sg, C_sn;
  const void *u, *delta, *z, *B, *C;
  const float *A, *D, *delta_bias, *initial_state;
  const int32_t* seq_idx;
  bool delta_softplus;
  int in_kind, bc_kind;          // ScalarKind of u/delta/z/out and of B/C
  int forward_warps;             // channels per forward block: 1..8 (tuning)
  int backward_variant;          // 0..1: tokens per lane and blocks per multiprocessor (see backward.cu)
  int forward_variant;           // 0..4: tokens per lane and register cap, see forward.cu
  // forward outputs
  void* out;
  float* last_state;             // may be null
  float* chunk_states;           // may be null (no backward planned)
  // backward inputs / outputs
  const void* dout;              // [batch, dim, seqlen], strides dout_sb, dout_sd
  int64_t dout_sb, dout_sd;
  const float* dlast_state;      // may be null
  void *du, *ddelta, *dz;        // contiguous [batch, dim, seqlen], in_kind
  float* dA_part;                // [batch, dim, dstate], zero-initialised, summed over batch later
  float* dD_part;                // [batch, dim]
  float* dbias_part;             // [batch, dim]
  float* dinitial_state;         // [batch, dim, dstate]
  float* dBC;                    // [2, batch, groups, slices, dstate, seqlen]
  int bc_slices;                 // deterministic: dim_per_group / warps (one slice per block); else 1
  bool bc_atomic;                // add into dBC atomically (several blocks share a slice)
};

constexpr int kChunk = 128;    // the forward saves the state entering every kChunk tokens

int chunk_count(int seqlen);
int backward_warps_per_block(int dim_per_group);
void launch_forward(const ScanParams& p, cudaStream_t stream);
void launch_backward(const ScanParams& p, cudaStream_t stream);

}  // namespace hzoo
