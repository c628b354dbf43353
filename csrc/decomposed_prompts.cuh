// Decomposed multitask prompts (PEFT MultitaskPromptTuning): torch-free host API of the CUDA kernels.
//
//   P_b[i, j] = S[i, j] * sum_k C[t, i, k] * R[t, k, j],   t = task_ids[b]
//   out[row_offsets[b] + i, j] = P_b[i, j]
//
// Shapes (all row-major, contiguous): S (l, d), C (K, l, r), R (K, r, d), out / grad (Rtot, d);
// task_ids, row_offsets (B,) int64; order (B,) int64 = batch items sorted (stably) by task;
// task_starts (K+1,) int64, so task t owns order[task_starts[t] : task_starts[t+1]].
// Elements are fp32, bf16 or fp16; every sum accumulates in fp32.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

namespace mptkern {

enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Backward tile of the (l, d) plane owned by one thread block; it sizes the fp32 workspaces.
constexpr int64_t kDpBwdTileRows = 16;
constexpr int64_t kDpBwdTileCols = 64;
inline int64_t dp_bwd_row_tiles(int64_t l) { return (l + kDpBwdTileRows - 1) / kDpBwdTileRows; }
inline int64_t dp_bwd_col_tiles(int64_t d) { return (d + kDpBwdTileCols - 1) / kDpBwdTileCols; }

// Writes the l prompt rows of each of the B items into out. Items whose task id is outside
// [0, K) are skipped (their rows are left untouched); row offsets are trusted.
cudaError_t decomposed_prompts_fwd(const void* shared, const void* task_cols, const void* task_rows,
                                   const int64_t* task_ids, const int64_t* row_offsets, void* out,
                                   int64_t B, int64_t K, int64_t l, int64_t r, int64_t d, Dtype dtype,
                                   cudaStream_t stream);

// Deterministic backward, no atomics. Writes grad_shared (l, d) in `dtype` and the fp32 partials
//   ws_cols (dp_bwd_col_tiles(d), K, l, r): dC summed over the columns of one column tile,
//   ws_rows (dp_bwd_row_tiles(l), K, r, d): dR summed over the rows of one row tile;
// the caller sums them over their first axis. Every element is written (zeros for empty tasks).
cudaError_t decomposed_prompts_bwd(const void* grad, const void* shared, const void* task_cols,
                                   const void* task_rows, const int64_t* row_offsets, const int64_t* order,
                                   const int64_t* task_starts, void* grad_shared, float* ws_cols,
                                   float* ws_rows, int64_t K, int64_t l, int64_t r, int64_t d, Dtype dtype,
                                   cudaStream_t stream);

}  // namespace mptkern
