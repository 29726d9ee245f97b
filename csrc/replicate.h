// Layer replication for G_stack growth: copy every source tensor into g-1 destinations,
// reading each source once. `destinations[c][i]` is copy c of `sources[i]`.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

namespace stackfast {

using CopyLists = std::vector<std::vector<at::Tensor>>;

// The public entry point: checks the arguments (TORCH_CHECK, so Python sees a
// RuntimeError naming the offending tensor), then runs the CPU or CUDA kernel.
void replicate_(const std::vector<at::Tensor>& sources, const CopyLists& destinations);

// The kernels assume checked arguments: one device, matching dtype and shape per pair,
// contiguous tensors, no destination overlapping its source.
void replicate_cpu(const std::vector<at::Tensor>& sources, const CopyLists& destinations);
#ifdef STACKFAST_WITH_CUDA
void replicate_cuda(const std::vector<at::Tensor>& sources, const CopyLists& destinations);
#endif

}  // namespace stackfast
