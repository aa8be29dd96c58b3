// Fused row permutation for sparse attention (SVG2-style semantic-aware permutation).
//
// gather : dst[t][bh, i, :] = src[t][bh, index[bh, i], :]   (put each cluster's tokens together)
// scatter: dst[t][bh, index[bh, i], :] = src[t][bh, i, :]   (its inverse: back to original order)
// for up to three tensors t (q, k, v) in a single launch, copying 16/8/4/2-byte vectors per thread.
// Three torch index ops each re-read the index and launch separately; this reads it once per row.
//
// Header-free on purpose (only the CUDA runtime): it compiles with plain `nvcc -c`, and the torch
// binding lives in bindings.cpp.  Rows whose index is out of [0, L) are written as zeros (gather)
// or dropped (scatter).

#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kMaxTensors = 3;

struct RowPtrs {
  const char* src[kMaxTensors];
  char* dst[kMaxTensors];
};

template <typename Vec, typename Idx>
__global__ void permute_rows_kernel(RowPtrs ptrs, const Idx* __restrict__ index, long long rows,
                                    long long seq_len, long long vecs_per_row, int scatter) {
  const Vec* __restrict__ src = reinterpret_cast<const Vec*>(ptrs.src[blockIdx.y]);
  Vec* __restrict__ dst = reinterpret_cast<Vec*>(ptrs.dst[blockIdx.y]);
  const long long total = rows * vecs_per_row;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const long long row = e / vecs_per_row;  // row = bh * seq_len + i
    const long long col = e - row * vecs_per_row;
    const long long base = row - row % seq_len;
    const long long j = (long long)__ldg(index + row);
    const bool ok = j >= 0 && j < seq_len;
    if (scatter) {
      if (ok) dst[(base + j) * vecs_per_row + col] = src[e];
    } else {
      Vec zero;
      memset(&zero, 0, sizeof(Vec));
      dst[e] = ok ? src[(base + j) * vecs_per_row + col] : zero;
    }
  }
}

template <typename Idx>
cudaError_t launch_for_vec(int vec_bytes, const RowPtrs& ptrs, int n, const Idx* index, long long rows,
                           long long seq_len, long long row_bytes, int scatter, cudaStream_t stream) {
  const long long vecs = row_bytes / vec_bytes;
  const long long total = rows * vecs;
  const int threads = 256;
  long long blocks = (total + threads - 1) / threads;
  if (blocks > 65535LL * 8) blocks = 65535LL * 8;  // grid-stride loop covers the rest
  dim3 grid((unsigned)(blocks > 0 ? blocks : 1), (unsigned)n);
  switch (vec_bytes) {
    case 16: permute_rows_kernel<uint4, Idx><<<grid, threads, 0, stream>>>(ptrs, index, rows, seq_len, vecs, scatter); break;
    case 8: permute_rows_kernel<uint2, Idx><<<grid, threads, 0, stream>>>(ptrs, index, rows, seq_len, vecs, scatter); break;
    case 4: permute_rows_kernel<uint32_t, Idx><<<grid, threads, 0, stream>>>(ptrs, index, rows, seq_len, vecs, scatter); break;
    case 2: permute_rows_kernel<uint16_t, Idx><<<grid, threads, 0, stream>>>(ptrs, index, rows, seq_len, vecs, scatter); break;
    default: permute_rows_kernel<uint8_t, Idx><<<grid, threads, 0, stream>>>(ptrs, index, rows, seq_len, vecs, scatter); break;
  }
  return cudaGetLastError();
}

}  // namespace

// src/dst: n (1..3) contiguous (rows = B*H*L, row_bytes) buffers; index: rows entries of int32
// (index_is_64 == 0) or int64.  Returns a cudaError_t value (0 on success).
extern "C" int ditaccel_permute_rows(const void* const* src, void* const* dst, int n, const void* index,
                                     int index_is_64, long long rows, long long seq_len, long long row_bytes,
                                     int scatter, void* stream) {
  if (n < 1 || n > kMaxTensors || seq_len <= 0 || rows % seq_len != 0) return (int)cudaErrorInvalidValue;
  if (rows == 0 || row_bytes == 0) return 0;
  RowPtrs ptrs = {};
  uintptr_t align = (uintptr_t)row_bytes;
  for (int t = 0; t < n; ++t) {
    ptrs.src[t] = static_cast<const char*>(src[t]);
    ptrs.dst[t] = static_cast<char*>(dst[t]);
    align |= (uintptr_t)src[t] | (uintptr_t)dst[t];
  }
  // Widest vector that divides the row size and every pointer's alignment.
  int vec_bytes = 16;
  while (vec_bytes > 1 && (align % vec_bytes) != 0) vec_bytes /= 2;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = index_is_64
      ? launch_for_vec(vec_bytes, ptrs, n, static_cast<const int64_t*>(index), rows, seq_len, row_bytes, scatter, s)
      : launch_for_vec(vec_bytes, ptrs, n, static_cast<const int32_t*>(index), rows, seq_len, row_bytes, scatter, s);
  return (int)err;
}
