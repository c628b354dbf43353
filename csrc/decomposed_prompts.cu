// Decomposed multitask prompts: forward and deterministic backward kernels (see the .cuh for the math).
#include "decomposed_prompts.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

namespace mptkern {
namespace {

// A block is kTx x kTy threads on a kBL x kBD tile of the (l, d) plane. Each thread owns one column
// (so every global load/store of a warp is contiguous in d) and kRpt rows interleaved by kTy.
constexpr int kTx = 64, kTy = 4, kRpt = 4;
constexpr int kThreads = kTx * kTy;
constexpr int kBL = kTy * kRpt, kBD = kTx;
constexpr int kKc = 32;  // rank chunk staged in shared memory; any r >= 1 loops over chunks
// Resident blocks per SM asked of ptxas: caps registers at 64 (fwd) / 80 (bwd); -warn-spills shows the cost.
constexpr int kFwdMinBlocks = 4, kBwdMinBlocks = 3;
static_assert(kBL == kDpBwdTileRows && kBD == kDpBwdTileCols, "workspace tiles must match the header");

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// One rank chunk of task t in fp32: c = C[t, i0:i0+kBL, k0:k0+kKc], r = R[t, k0:k0+kKc, j0:j0+kBD].
struct Stage {
  float c[kBL][kKc + 1];
  float r[kKc][kBD + 1];  // +1 pad: the dC dot product reads r[k][j] with k varying across a warp
};

// Ct = C[t] (l, r), Rt = R[t] (r, d); the launchers check (l + kBL) * r < 2^31 for the int offsets.
// Out-of-range entries are zero-filled, not skipped: stale shared memory may hold NaN bits and
// 0 * NaN would leak into the in-tile reductions of the backward.
template <typename T>
__device__ __forceinline__ void stage_chunk(Stage& s, const T* __restrict__ Ct, const T* __restrict__ Rt, int i0,
                                            int64_t j0, int k0, int kc, int l, int r, int64_t d, int tid) {
  for (int e = tid; e < kBL * kKc; e += kThreads) {
    const int row = e / kKc, k = e % kKc, i = i0 + row;
    s.c[row][k] = (i < l && k < kc) ? to_f(Ct[i * r + k0 + k]) : 0.f;
  }
  for (int e = tid; e < kc * kBD; e += kThreads) {  // rows k >= kc are never read
    const int k = e / kBD, c = e % kBD;
    const int64_t j = j0 + c;
    s.r[k][c] = j < d ? to_f(Rt[(k0 + k) * d + j]) : 0.f;
  }
}

// m[ii] += sum_{k < kc} C[i, k] * R[k, j] for this thread's rows i and column j.
__device__ __forceinline__ void accumulate_m(const Stage& s, float (&m)[kRpt], int kc, int tx, int ty) {
  for (int k = 0; k < kc; ++k) {
    const float rv = s.r[k][tx];
#pragma unroll
    for (int ii = 0; ii < kRpt; ++ii) m[ii] += s.c[ty + ii * kTy][k] * rv;
  }
}

// grid (col tiles, row tiles, min(B, 65535)); z strides over the batch items.
template <typename T>
__global__ void __launch_bounds__(kThreads, kFwdMinBlocks)
    dp_fwd_kernel(const T* __restrict__ S, const T* __restrict__ C, const T* __restrict__ R,
                  const int64_t* __restrict__ task_ids, const int64_t* __restrict__ row_offsets, T* __restrict__ out,
                  int64_t B, int64_t K, int l, int r, int64_t d) {
  __shared__ Stage s;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTx + tx;
  const int i0 = blockIdx.y * kBL;
  const int64_t j0 = int64_t(blockIdx.x) * kBD, j = j0 + tx;
  float sv[kRpt];
#pragma unroll
  for (int ii = 0; ii < kRpt; ++ii) {
    const int i = i0 + ty + ii * kTy;
    sv[ii] = (i < l && j < d) ? to_f(S[i * d + j]) : 0.f;
  }
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    const int64_t t = task_ids[b];
    if (t < 0 || t >= K) continue;  // same t for the whole block, so the barriers below stay uniform
    float m[kRpt] = {};
    for (int k0 = 0; k0 < r; k0 += kKc) {
      const int kc = min(kKc, r - k0);
      __syncthreads();  // the previous chunk (or item) is no longer being read
      stage_chunk(s, C + t * l * r, R + t * r * d, i0, j0, k0, kc, l, r, d, tid);
      __syncthreads();
      accumulate_m(s, m, kc, tx, ty);
    }
    T* o = out + row_offsets[b] * d + j;  // 64-bit: row offsets index a (Rtot, d) buffer
#pragma unroll
    for (int ii = 0; ii < kRpt; ++ii) {
      const int i = i0 + ty + ii * kTy;
      if (i < l && j < d) o[i * d] = from_f<T>(sv[ii] * m[ii]);
    }
  }
}

// grid (col tiles, row tiles). The block owns its tile for every task, so dS is summed in registers in
// task order and written once; dC / dR partials go to per-tile fp32 slices that nobody else writes.
template <typename T>
__global__ void __launch_bounds__(kThreads, kBwdMinBlocks)
    dp_bwd_kernel(const T* __restrict__ G, const T* __restrict__ S, const T* __restrict__ C, const T* __restrict__ R,
                  const int64_t* __restrict__ row_offsets, const int64_t* __restrict__ order,
                  const int64_t* __restrict__ task_starts, T* __restrict__ dS, float* __restrict__ ws_cols,
                  float* __restrict__ ws_rows, int64_t K, int l, int r, int64_t d) {
  __shared__ Stage s;
  __shared__ float w[kBL][kBD];  // W_t = H_t * S on this tile
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kTx + tx;
  const int i0 = blockIdx.y * kBL;
  const int64_t j0 = int64_t(blockIdx.x) * kBD, j = j0 + tx;
  float sv[kRpt], ds[kRpt] = {};
#pragma unroll
  for (int ii = 0; ii < kRpt; ++ii) {
    const int i = i0 + ty + ii * kTy;
    sv[ii] = (i < l && j < d) ? to_f(S[i * d + j]) : 0.f;
  }
  for (int64_t t = 0; t < K; ++t) {
    const int64_t p0 = task_starts[t], p1 = task_starts[t + 1];
    float* wc = ws_cols + (blockIdx.x * K + t) * l * r;  // (l, r) slice: this column tile, task t
    float* wr = ws_rows + (blockIdx.y * K + t) * r * d;  // (r, d) slice: this row tile, task t
    if (p1 <= p0) {  // task absent from the batch: zero partials, nothing for dS
      for (int e = tid; e < kBL * r; e += kThreads)
        if (i0 + e / r < l) wc[i0 * r + e] = 0.f;
      for (int e = tid; e < r * kBD; e += kThreads)
        if (j0 + e % kBD < d) wr[(e / kBD) * d + j0 + e % kBD] = 0.f;
      continue;
    }
    float h[kRpt] = {};
    for (int64_t p = p0; p < p1; ++p) {  // H_t: items summed in `order`, i.e. a fixed order
      const T* g = G + row_offsets[order[p]] * d + j;
#pragma unroll
      for (int ii = 0; ii < kRpt; ++ii) {
        const int i = i0 + ty + ii * kTy;
        if (i < l && j < d) h[ii] += to_f(g[i * d]);
      }
    }
    __syncthreads();  // w of the previous task may still be read
#pragma unroll
    for (int ii = 0; ii < kRpt; ++ii) w[ty + ii * kTy][tx] = h[ii] * sv[ii];
    float m[kRpt] = {};
    for (int k0 = 0; k0 < r; k0 += kKc) {
      const int kc = min(kKc, r - k0);
      __syncthreads();  // previous chunk no longer read; w visible to all
      stage_chunk(s, C + t * l * r, R + t * r * d, i0, j0, k0, kc, l, r, d, tid);
      __syncthreads();
      accumulate_m(s, m, kc, tx, ty);
      // dC[i, k0+k] over this tile's columns: a warp shares i and spans k (broadcast w, padded r).
      for (int o = tid; o < kBL * kKc; o += kThreads) {
        const int row = o / kKc, k = o % kKc;
        if (k >= kc || i0 + row >= l) continue;
        float acc = 0.f;
#pragma unroll 8
        for (int c = 0; c < kBD; ++c) acc += w[row][c] * s.r[k][c];
        wc[(i0 + row) * r + k0 + k] = acc;
      }
      // dR[k0+k, j] over this tile's rows: a warp shares k and spans j (coalesced store).
      for (int o = tid; o < kc * kBD; o += kThreads) {
        const int k = o / kBD, c = o % kBD;
        if (j0 + c >= d) continue;
        float acc = 0.f;
#pragma unroll
        for (int row = 0; row < kBL; ++row) acc += s.c[row][k] * w[row][c];
        wr[(k0 + k) * d + j0 + c] = acc;
      }
    }
#pragma unroll
    for (int ii = 0; ii < kRpt; ++ii) ds[ii] += h[ii] * m[ii];
  }
#pragma unroll
  for (int ii = 0; ii < kRpt; ++ii) {
    const int i = i0 + ty + ii * kTy;
    if (i < l && j < d) dS[i * d + j] = from_f<T>(ds[ii]);
  }
}

// Calls f with a null T* for the element type named by dtype.
template <typename F>
cudaError_t dispatch(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat32: return f(static_cast<float*>(nullptr));
    case Dtype::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    case Dtype::kFloat16: return f(static_cast<__half*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

// Tile grid of the (l, d) plane; false past CUDA's grid limits (l > ~1M rows) or where the 32-bit
// in-task offsets (up to (l + kBL) * r) could overflow.
bool tile_grid(int64_t l, int64_t r, int64_t d, dim3& grid) {
  const int64_t n_ct = dp_bwd_col_tiles(d), n_rt = dp_bwd_row_tiles(l);
  if (n_ct > 0x7fffffff || n_rt > 65535 || r > 0x7fffffff / (l + kBL)) return false;
  grid = dim3(unsigned(n_ct), unsigned(n_rt), 1);
  return true;
}

}  // namespace

cudaError_t decomposed_prompts_fwd(const void* shared, const void* task_cols, const void* task_rows,
                                   const int64_t* task_ids, const int64_t* row_offsets, void* out, int64_t B,
                                   int64_t K, int64_t l, int64_t r, int64_t d, Dtype dtype, cudaStream_t stream) {
  if (B < 0 || K < 0 || l < 0 || r < 0 || d < 0) return cudaErrorInvalidValue;
  if (B == 0 || l == 0 || d == 0) return cudaSuccess;
  dim3 grid;
  if (!tile_grid(l, r, d, grid)) return cudaErrorInvalidValue;
  grid.z = unsigned(std::min<int64_t>(B, 65535));
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dp_fwd_kernel<T><<<grid, dim3(kTx, kTy), 0, stream>>>(
        static_cast<const T*>(shared), static_cast<const T*>(task_cols), static_cast<const T*>(task_rows), task_ids,
        row_offsets, static_cast<T*>(out), B, K, int(l), int(r), d);
    return cudaGetLastError();
  });
}

cudaError_t decomposed_prompts_bwd(const void* grad, const void* shared, const void* task_cols, const void* task_rows,
                                   const int64_t* row_offsets, const int64_t* order, const int64_t* task_starts,
                                   void* grad_shared, float* ws_cols, float* ws_rows, int64_t K, int64_t l, int64_t r,
                                   int64_t d, Dtype dtype, cudaStream_t stream) {
  if (K < 0 || l < 0 || r < 0 || d < 0) return cudaErrorInvalidValue;
  if (l == 0 || d == 0) return cudaSuccess;  // no tiles: every output and workspace is empty
  dim3 grid;
  if (!tile_grid(l, r, d, grid)) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    dp_bwd_kernel<T><<<grid, dim3(kTx, kTy), 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(shared), static_cast<const T*>(task_cols),
        static_cast<const T*>(task_rows), row_offsets, order, task_starts, static_cast<T*>(grad_shared), ws_cols,
        ws_rows, K, int(l), int(r), d);
    return cudaGetLastError();
  });
}

}  // namespace mptkern
