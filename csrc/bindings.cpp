// Torch binding for csrc/permute_gather.cu (built by ditaccel/kernels/cuda.py with
// torch.utils.cpp_extension.load).  Input checks are repeated in Python with friendlier messages.
// Only <torch/extension.h>: the caller passes the CUDA stream handle and sets the current device,
// so this file also syntax-checks against a CPU-only torch install (tests/kernels/test_cuda_compiles.py).

#include <torch/extension.h>

#include <vector>

extern "C" int ditaccel_permute_rows(const void* const* src, void* const* dst, int n, const void* index,
                                     int index_is_64, long long rows, long long seq_len, long long row_bytes,
                                     int scatter, void* stream);

// tensors: 1..3 CUDA tensors of the same shape (B, H, L, D) and dtype; index: (B, H, L) int32/int64.
// scatter == false: out[..., i, :] = x[..., index[i], :]; true: out[..., index[i], :] = x[..., i, :].
// stream: the cudaStream_t of the tensors' device as an integer (torch.cuda.current_stream().cuda_stream).
std::vector<at::Tensor> permute_rows(std::vector<at::Tensor> tensors, at::Tensor index, bool scatter,
                                     int64_t stream) {
  TORCH_CHECK(!tensors.empty() && tensors.size() <= 3, "permute_rows takes 1 to 3 tensors, got ", tensors.size());
  const at::Tensor& first = tensors[0];
  TORCH_CHECK(first.is_cuda() && first.dim() == 4, "expected CUDA tensors of shape (B, H, L, D)");
  TORCH_CHECK(index.device() == first.device(), "index must be on ", first.device(), ", got ", index.device());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, "index must be int32 or int64");
  TORCH_CHECK(index.dim() == 3 && index.size(0) == first.size(0) && index.size(1) == first.size(1) &&
                  index.size(2) == first.size(2),
              "index must have shape (B, H, L) = ", first.sizes().slice(0, 3), ", got ", index.sizes());
  at::Tensor idx = index.contiguous();
  std::vector<at::Tensor> srcs, outs;
  const void* src_ptrs[3];
  void* dst_ptrs[3];
  for (size_t t = 0; t < tensors.size(); ++t) {
    TORCH_CHECK(tensors[t].sizes() == first.sizes() && tensors[t].scalar_type() == first.scalar_type() &&
                    tensors[t].device() == first.device(),
                "all tensors must match the first one's shape, dtype and device");
    srcs.push_back(tensors[t].contiguous());
    outs.push_back(at::empty_like(srcs.back(), at::MemoryFormat::Contiguous));
    src_ptrs[t] = srcs.back().data_ptr();
    dst_ptrs[t] = outs.back().data_ptr();
  }
  const long long seq_len = first.size(2);
  const long long rows = first.size(0) * first.size(1) * seq_len;
  const long long row_bytes = first.size(3) * (long long)first.element_size();
  const int err = ditaccel_permute_rows(src_ptrs, dst_ptrs, (int)tensors.size(), idx.data_ptr(),
                                        idx.scalar_type() == at::kLong, rows, seq_len, row_bytes, scatter ? 1 : 0,
                                        reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "ditaccel_permute_rows failed with CUDA error code ", err);
  return outs;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("permute_rows", &permute_rows, "Fused gather/scatter of (B,H,L,D) rows by a (B,H,L) index",
        py::arg("tensors"), py::arg("index"), py::arg("scatter"), py::arg("stream"));
}
