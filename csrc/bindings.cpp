// Torch op registration for the csrc/ kernels: schemas in `mptkern_C`, CUDA implementations that check
// their inputs and launch on the current torch stream of the inputs' device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "decomposed_prompts.cuh"

namespace mptkern {
namespace {

Dtype to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    default: TORCH_CHECK(false, "mptkern_C: dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// CUDA, contiguous, on `device` (the first tensor's), of `dtype`, with `dim` dimensions.
void check(const at::Tensor& t, const char* name, const at::Device& device, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), "mptkern_C: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, "mptkern_C: ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.is_contiguous(), "mptkern_C: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "mptkern_C: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "mptkern_C: ", name, " must have ", dim, " dims, got shape ", t.sizes());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "mptkern_C::", op, " launch failed: ", cudaGetErrorString(err));
}

// shared (l, d); task_cols (K, l, r); task_rows (K, r, d); returns (K, l, r, d).
std::array<int64_t, 4> check_factors(const at::Tensor& shared, const at::Tensor& cols, const at::Tensor& rows) {
  const auto dev = shared.device();
  const auto dt = shared.scalar_type();
  check(shared, "shared", dev, dt, 2);
  check(cols, "task_cols", dev, dt, 3);
  check(rows, "task_rows", dev, dt, 3);
  const int64_t l = shared.size(0), d = shared.size(1), K = cols.size(0), r = cols.size(2);
  TORCH_CHECK(cols.size(1) == l, "mptkern_C: task_cols must be (K, l, r) with l = ", l, ", got ", cols.sizes());
  TORCH_CHECK(r >= 1, "mptkern_C: rank r must be >= 1, got task_cols ", cols.sizes());
  TORCH_CHECK(rows.size(0) == K && rows.size(1) == r && rows.size(2) == d,
              "mptkern_C: task_rows must be (K, r, d) = (", K, ", ", r, ", ", d, "), got ", rows.sizes());
  return {K, l, r, d};
}

// Row offsets and task ids are not range-checked here (that needs a device sync): the rows
// row_offsets[b] .. row_offsets[b] + l - 1 must lie in out, and ids outside [0, K) are skipped.
void fwd_op(const at::Tensor& shared, const at::Tensor& task_cols, const at::Tensor& task_rows,
                            const at::Tensor& task_ids, const at::Tensor& row_offsets, const at::Tensor& out) {
  const auto [K, l, r, d] = check_factors(shared, task_cols, task_rows);
  const auto dev = shared.device();
  check(task_ids, "task_ids", dev, at::kLong, 1);
  check(row_offsets, "row_offsets", dev, at::kLong, 1);
  check(out, "out", dev, shared.scalar_type(), 2);
  const int64_t B = task_ids.size(0);
  TORCH_CHECK(row_offsets.size(0) == B, "mptkern_C: row_offsets must be (B,) with B = ", B);
  TORCH_CHECK(out.size(1) == d, "mptkern_C: out must be (Rtot, d) with d = ", d, ", got ", out.sizes());
  const c10::cuda::CUDAGuard guard(dev);
  check_launch(mptkern::decomposed_prompts_fwd(shared.data_ptr(), task_cols.data_ptr(), task_rows.data_ptr(),
                                               task_ids.data_ptr<int64_t>(), row_offsets.data_ptr<int64_t>(),
                                               out.data_ptr(), B, K, l, r, d, to_dtype(shared),
                                               c10::cuda::getCurrentCUDAStream(dev.index()).stream()),
               "decomposed_prompts_fwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& grad, const at::Tensor& shared, const at::Tensor& task_cols, const at::Tensor& task_rows,
    const at::Tensor& row_offsets, const at::Tensor& order, const at::Tensor& task_starts) {
  const auto [K, l, r, d] = check_factors(shared, task_cols, task_rows);
  const auto dev = shared.device();
  check(grad, "grad", dev, shared.scalar_type(), 2);
  check(row_offsets, "row_offsets", dev, at::kLong, 1);
  check(order, "order", dev, at::kLong, 1);
  check(task_starts, "task_starts", dev, at::kLong, 1);
  TORCH_CHECK(grad.size(1) == d, "mptkern_C: grad must be (Rtot, d) with d = ", d, ", got ", grad.sizes());
  TORCH_CHECK(order.size(0) == row_offsets.size(0), "mptkern_C: order and row_offsets must both be (B,)");
  TORCH_CHECK(task_starts.size(0) == K + 1, "mptkern_C: task_starts must be (K+1,) = (", K + 1, ",), got ",
              task_starts.sizes());
  const c10::cuda::CUDAGuard guard(dev);
  const auto f32 = shared.options().dtype(at::kFloat);
  auto grad_shared = at::empty({l, d}, shared.options());
  // Per-tile fp32 partials; at::sum over the tile axis is deterministic, so the whole backward is.
  auto ws_cols = at::empty({dp_bwd_col_tiles(d), K, l, r}, f32);
  auto ws_rows = at::empty({dp_bwd_row_tiles(l), K, r, d}, f32);
  check_launch(mptkern::decomposed_prompts_bwd(grad.data_ptr(), shared.data_ptr(), task_cols.data_ptr(),
                                               task_rows.data_ptr(), row_offsets.data_ptr<int64_t>(),
                                               order.data_ptr<int64_t>(), task_starts.data_ptr<int64_t>(),
                                               grad_shared.data_ptr(), ws_cols.data_ptr<float>(),
                                               ws_rows.data_ptr<float>(), K, l, r, d, to_dtype(shared),
                                               c10::cuda::getCurrentCUDAStream(dev.index()).stream()),
               "decomposed_prompts_bwd");
  return {grad_shared, ws_cols.sum(0).to(shared.scalar_type()), ws_rows.sum(0).to(shared.scalar_type())};
}

}  // namespace
}  // namespace mptkern

TORCH_LIBRARY(mptkern_C, m) {
  m.def(
      "decomposed_prompts_fwd(Tensor shared, Tensor task_cols, Tensor task_rows, Tensor task_ids, "
      "Tensor row_offsets, Tensor(a!) out) -> ()");
  m.def(
      "decomposed_prompts_bwd(Tensor grad, Tensor shared, Tensor task_cols, Tensor task_rows, "
      "Tensor row_offsets, Tensor order, Tensor task_starts) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mptkern_C, CUDA, m) {
  m.impl("decomposed_prompts_fwd", &mptkern::fwd_op);
  m.impl("decomposed_prompts_bwd", &mptkern::bwd_op);
}
