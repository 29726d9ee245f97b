#include "replicate.h"

#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

namespace stackfast {
namespace {

// The Python fallback in stackfast/ops/replicate.py (_check_tensors) runs the same checks
// in the same order with the same messages, so errors do not depend on whether this
// extension is built. The list lengths are checked there first, as a ValueError.
void check_arguments(const std::vector<at::Tensor>& sources, const CopyLists& destinations) {
  const size_t n = sources.size();
  for (size_t c = 0; c < destinations.size(); ++c) {
    TORCH_CHECK(destinations[c].size() == n, "replicate_: destinations[", c, "] holds ",
                destinations[c].size(), " tensors but sources holds ", n);
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& src = sources[i];
    TORCH_CHECK(src.device() == sources[0].device(), "replicate_: sources[", i, "] is on ",
                src.device(), " but sources[0] is on ", sources[0].device());
    TORCH_CHECK(src.is_contiguous(), "replicate_: sources[", i, "] is not contiguous");
    const char* src_begin = static_cast<const char*>(src.data_ptr());
    const char* src_end = src_begin + src.nbytes();
    for (size_t c = 0; c < destinations.size(); ++c) {
      const at::Tensor& dst = destinations[c][i];
      TORCH_CHECK(dst.device() == src.device(), "replicate_: destinations[", c, "][", i,
                  "] is on ", dst.device(), " but sources[", i, "] is on ", src.device());
      TORCH_CHECK(dst.scalar_type() == src.scalar_type(), "replicate_: destinations[", c, "][",
                  i, "] has dtype ", dst.scalar_type(), " but sources[", i, "] has dtype ",
                  src.scalar_type());
      TORCH_CHECK(dst.sizes() == src.sizes(), "replicate_: destinations[", c, "][", i,
                  "] has shape ", dst.sizes(), " but sources[", i, "] has shape ", src.sizes());
      TORCH_CHECK(dst.is_contiguous(), "replicate_: destinations[", c, "][", i,
                  "] is not contiguous");
      const char* dst_begin = static_cast<const char*>(dst.data_ptr());
      const char* dst_end = dst_begin + dst.nbytes();
      const bool empty = src_begin == src_end || dst_begin == dst_end;
      TORCH_CHECK(empty || dst_end <= src_begin || src_end <= dst_begin, "replicate_: destinations[",
                  c, "][", i, "] overlaps sources[", i, "]");
    }
  }
}

// Threads split the sources into pieces of at least this many bytes: smaller pieces
// cost more in thread start-up than they gain.
constexpr int64_t kGrainBytes = 256 << 10;
// Each piece is copied in blocks of this size, which stay in L2 cache while they are
// written to every destination: memory reads each source byte once.
constexpr int64_t kBlockBytes = 64 << 10;

}  // namespace

void replicate_cpu(const std::vector<at::Tensor>& sources, const CopyLists& destinations) {
  const size_t n = sources.size();
  // starts[i] is where sources[i] begins when all sources are laid end to end; threads
  // split that virtual buffer, so a few big tensors and many small ones balance alike.
  std::vector<int64_t> starts(n + 1, 0);
  std::vector<const char*> src_ptrs(n);
  for (size_t i = 0; i < n; ++i) {
    starts[i + 1] = starts[i] + static_cast<int64_t>(sources[i].nbytes());
    src_ptrs[i] = static_cast<const char*>(sources[i].data_ptr());
  }
  at::parallel_for(0, starts[n], kGrainBytes, [&](int64_t begin, int64_t end) {
    // The last source starting at or before `begin` holds it (empty sources are skipped).
    size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (int64_t pos = begin; pos < end; ++i) {
      // Bytes [first, last) of sources[i] are this thread's.
      const int64_t first = pos - starts[i];
      const int64_t last = std::min(end, starts[i + 1]) - starts[i];
      for (int64_t offset = first; offset < last; offset += kBlockBytes) {
        const int64_t bytes = std::min(kBlockBytes, last - offset);
        for (const auto& copies : destinations) {
          std::memcpy(static_cast<char*>(copies[i].data_ptr()) + offset, src_ptrs[i] + offset,
                      bytes);
        }
      }
      pos = starts[i] + last;
    }
  });
}

void replicate_(const std::vector<at::Tensor>& sources, const CopyLists& destinations) {
  check_arguments(sources, destinations);
  if (sources.empty() || destinations.empty()) {
    return;
  }
  const c10::Device device = sources[0].device();
  if (device.is_cpu()) {
    replicate_cpu(sources, destinations);
  } else if (device.is_cuda()) {
#ifdef STACKFAST_WITH_CUDA
    replicate_cuda(sources, destinations);
#else
    TORCH_CHECK(false, "replicate_: this build of the extension has no CUDA kernel");
#endif
  } else {
    TORCH_CHECK(false, "replicate_: no kernel for tensors on ", device);
  }
  // In-place ops bump the version counter so that autograd notices a tensor it saved
  // for backward has been overwritten.
  for (const auto& copies : destinations) {
    for (const at::Tensor& dst : copies) {
      dst.unsafeGetTensorImpl()->bump_version();
    }
  }
}

}  // namespace stackfast
