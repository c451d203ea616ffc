// Torch binding of the selective scan kernels: tensors in, pointers and strides out to the launchers.
// Python (kernels/selective_scan/fused.py) allocates every output and checks shapes; this file
// checks only what would make the kernel read or write out of bounds.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "scan.h"

namespace {

int scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return hzoo::kFloat32;
    case at::kHalf: return hzoo::kFloat16;
    case at::kBFloat16: return hzoo::kBFloat16;
    default: TORCH_CHECK(false, "selective_scan: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return 0;
}

void check_rows(const at::Tensor& t, const char* name, int64_t batch, int64_t dim, int64_t seqlen) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 3 && t.size(0) == batch && t.size(1) == dim && t.size(2) == seqlen,
              "selective_scan: ", name, " must be a CUDA tensor [", batch, ", ", dim, ", ", seqlen, "]");
  TORCH_CHECK(t.stride(2) == 1 || seqlen == 1, "selective_scan: ", name, " must be contiguous along seqlen");
}

void check_f32(const c10::optional<at::Tensor>& t, const char* name, int64_t numel) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel,
              "selective_scan: ", name, " must be a contiguous float32 CUDA tensor of ", numel, " elements");
}

const float* f32_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

hzoo::ScanParams make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                             const at::Tensor& B, const at::Tensor& C,
                             const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                             const c10::optional<at::Tensor>& delta_bias,
                             const c10::optional<at::Tensor>& initial_state,
                             const c10::optional<at::Tensor>& seq_idx, bool delta_softplus) {
  hzoo::ScanParams p{};
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  check_rows(u, "u", batch, dim, seqlen);
  check_rows(delta, "delta", batch, dim, seqlen);
  TORCH_CHECK(delta.scalar_type() == u.scalar_type(), "selective_scan: delta must have u's dtype");
  TORCH_CHECK(A.is_cuda() && A.scalar_type() == at::kFloat && A.is_contiguous() && A.dim() == 2 && A.size(0) == dim,
              "selective_scan: A must be a contiguous float32 CUDA tensor [dim, dstate]");
  const int64_t dstate = A.size(1);
  TORCH_CHECK(B.dim() == 4 && B.size(0) == batch && B.size(2) == dstate && B.size(3) == seqlen && B.is_cuda(),
              "selective_scan: B must be [batch, groups, dstate, seqlen]");
  TORCH_CHECK(C.sizes() == B.sizes() && C.scalar_type() == B.scalar_type() && C.is_cuda(),
              "selective_scan: C must match B in shape and dtype");
  TORCH_CHECK(B.stride(3) == 1 && C.stride(3) == 1, "selective_scan: B and C must be contiguous along seqlen");
  const int64_t groups = B.size(1);
  TORCH_CHECK(groups > 0 && dim % groups == 0, "selective_scan: groups must divide dim");
  check_f32(D, "D", dim);
  check_f32(delta_bias, "delta_bias", dim);
  check_f32(initial_state, "initial_state", batch * dim * dstate);
  if (z.has_value()) {
    check_rows(*z, "z", batch, dim, seqlen);
    TORCH_CHECK(z->scalar_type() == u.scalar_type(), "selective_scan: z must have u's dtype");
  }
  if (seq_idx.has_value())
    TORCH_CHECK(seq_idx->is_cuda() && seq_idx->scalar_type() == at::kInt && seq_idx->is_contiguous() &&
                    seq_idx->numel() == batch * seqlen,
                "selective_scan: seq_idx must be a contiguous int32 CUDA tensor [batch, seqlen]");
  p.batch = batch; p.dim = dim; p.seqlen = seqlen; p.dstate = dstate; p.ngroups = groups;
  p.dim_per_group = dim / groups;
  p.nchunks = hzoo::chunk_count(seqlen);
  p.u_sb = u.stride(0); p.u_sd = u.stride(1);
  p.delta_sb = delta.stride(0); p.delta_sd = delta.stride(1);
  p.B_sb = B.stride(0); p.B_sg = B.stride(1); p.B_sn = B.stride(2);
  p.C_sb = C.stride(0); p.C_sg = C.stride(1); p.C_sn = C.stride(2);
  p.u = u.data_ptr(); p.delta = delta.data_ptr(); p.B = B.data_ptr(); p.C = C.data_ptr();
  if (z.has_value()) { p.z = z->data_ptr(); p.z_sb = z->stride(0); p.z_sd = z->stride(1); }
  p.A = A.data_ptr<float>();
  p.D = f32_or_null(D);
  p.delta_bias = f32_or_null(delta_bias);
  p.initial_state = f32_or_null(initial_state);
  p.seq_idx = seq_idx.has_value() ? seq_idx->data_ptr<int32_t>() : nullptr;
  p.delta_softplus = delta_softplus;
  p.in_kind = scalar_kind(u, "u");
  p.bc_kind = scalar_kind(B, "B");
  TORCH_CHECK(p.bc_kind == p.in_kind || p.bc_kind == hzoo::kFloat32,
              "selective_scan: B and C must have u's dtype or float32");
  return p;
}

void forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
             const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
             const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& initial_state,
             const c10::optional<at::Tensor>& seq_idx, bool delta_softplus, at::Tensor& out,
             at::Tensor& last_state, const c10::optional<at::Tensor>& chunk_states, int64_t forward_warps,
             int64_t forward_variant) {
  const c10::cuda::CUDAGuard guard(u.device());
  hzoo::ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus);
  check_rows(out, "out", p.batch, p.dim, p.seqlen);
  TORCH_CHECK(out.scalar_type() == u.scalar_type(), "selective_scan: out must have u's dtype");
  check_f32(last_state, "last_state", int64_t(p.batch) * p.dim * p.dstate);
  check_f32(chunk_states, "chunk_states", int64_t(p.batch) * p.dim * p.nchunks * p.dstate);
  p.out = out.data_ptr(); p.out_sb = out.stride(0); p.out_sd = out.stride(1);
  p.last_state = last_state.data_ptr<float>();
  p.chunk_states = chunk_states.has_value() ? chunk_states->data_ptr<float>() : nullptr;
  TORCH_CHECK(forward_warps >= 1 && forward_warps <= 8, "selective_scan: forward_warps must be in 1..8");
  p.forward_warps = forward_warps;
  p.forward_variant = forward_variant;
  hzoo::launch_forward(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
              const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& seq_idx,
              bool delta_softplus, const at::Tensor& chunk_states, const at::Tensor& dout,
              const c10::optional<at::Tensor>& dlast_state, at::Tensor& du, at::Tensor& ddelta,
              const c10::optional<at::Tensor>& dz, at::Tensor& dA_part, at::Tensor& dD_part,
              at::Tensor& dbias_part, at::Tensor& dinitial_state, at::Tensor& dBC, int64_t bc_slices,
              bool bc_atomic, int64_t backward_variant) {
  const c10::cuda::CUDAGuard guard(u.device());
  hzoo::ScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, c10::nullopt, seq_idx, delta_softplus);
  const int64_t bdn = int64_t(p.batch) * p.dim * p.dstate;
  check_f32(chunk_states, "chunk_states", bdn * p.nchunks);
  check_rows(dout, "dout", p.batch, p.dim, p.seqlen);
  TORCH_CHECK(dout.scalar_type() == u.scalar_type(), "selective_scan: dout must have u's dtype");
  check_f32(dlast_state, "dlast_state", bdn);
  for (const at::Tensor* t : {&du, &ddelta}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == u.scalar_type() && t->sizes() == u.sizes(),
                "selective_scan: du/ddelta must be contiguous like u");
  }
  if (z.has_value())
    TORCH_CHECK(dz.has_value() && dz->is_contiguous() && dz->scalar_type() == u.scalar_type() && dz->sizes() == u.sizes(),
                "selective_scan: dz must be contiguous like u");
  check_f32(dA_part, "dA_part", bdn);
  check_f32(dD_part, "dD_part", int64_t(p.batch) * p.dim);
  check_f32(dbias_part, "dbias_part", int64_t(p.batch) * p.dim);
  check_f32(dinitial_state, "dinitial_state", bdn);
  const int warps = hzoo::backward_warps_per_block(p.dim_per_group);
  TORCH_CHECK(bc_slices == 1 || bc_slices == p.dim_per_group / warps, "selective_scan: bad bc_slices");
  check_f32(dBC, "dBC", 2 * int64_t(p.batch) * p.ngroups * bc_slices * p.dstate * p.seqlen);
  p.chunk_states = chunk_states.data_ptr<float>();
  p.dout = dout.data_ptr(); p.dout_sb = dout.stride(0); p.dout_sd = dout.stride(1);
  p.dlast_state = f32_or_null(dlast_state);
  p.du = du.data_ptr(); p.ddelta = ddelta.data_ptr(); p.dz = dz.has_value() ? dz->data_ptr() : nullptr;
  p.dA_part = dA_part.data_ptr<float>();
  p.dD_part = dD_part.data_ptr<float>();
  p.dbias_part = dbias_part.data_ptr<float>();
  p.dinitial_state = dinitial_state.data_ptr<float>();
  p.dBC = dBC.data_ptr<float>();
  p.bc_slices = bc_slices;
  p.bc_atomic = bc_atomic;
  p.backward_variant = backward_variant;
  hzoo::launch_backward(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward (writes out, last_state, chunk_states)");
  m.def("backward", &backward, "selective scan backward (writes the gradient buffers)");
  m.def("chunk_count", &hzoo::chunk_count, "chunks of the forward's saved states for a seqlen");
  m.def("backward_warps_per_block", &hzoo::backward_warps_per_block, "channels per backward block");
}
