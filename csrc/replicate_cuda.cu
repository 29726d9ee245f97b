// One launch copies every source into all its destinations. Each block takes 256 KiB
// chunks of the sources in turn (grid-stride), loads each 16-byte vector of a chunk once
// and stores it to every destination, so HBM reads each source once.
#include "replicate.h"

#include <cstdint>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace stackfast {
namespace {

constexpr int kThreads = 512;
// 2 x 512 resident threads per SM (registers capped at 64 by __launch_bounds__) keep
// 64 KiB of loads in flight per SM, enough to cover HBM latency.
constexpr int kBlocksPerSm = 2;
constexpr int kUnroll = 4;       // vectors in flight per thread, to hide load latency
constexpr int64_t kChunkBytes = 256 << 10;

// The metadata array (int64), with n sources and `copies` destinations per source:
//   chunk_starts[n + 1]: first chunk of source i; chunk_starts[n] is the chunk count
//   src[n], nbytes[n]:   address and size of source i
//   dst[copies * n]:     dst[c * n + i] is the address of copy c of source i
struct Metadata {
  const int64_t* chunk_starts;
  const int64_t* src;
  const int64_t* nbytes;
  const int64_t* dst;
  __device__ Metadata(const int64_t* meta, int64_t n)
      : chunk_starts(meta), src(meta + n + 1), nbytes(meta + 2 * n + 1), dst(meta + 3 * n + 1) {}
};

// Copies bytes [begin, end) of `src` to every destination of source i with vectors of
// type Vec. The caller guarantees that src and all destinations have the same address
// modulo sizeof(Vec), so after a short unaligned head every access is aligned.
template <typename Vec>
__device__ void copy_chunk(const char* src, const Metadata& meta, int64_t n, int64_t i,
                           int copies, int64_t begin, int64_t end) {
  constexpr int64_t kVec = sizeof(Vec);
  const int64_t misalignment = reinterpret_cast<uintptr_t>(src + begin) % kVec;
  const int64_t vec_begin = min(end, begin + (kVec - misalignment) % kVec);
  const int64_t num_vecs = (end - vec_begin) / kVec;
  const int64_t vec_end = vec_begin + num_vecs * kVec;

  // Head [begin, vec_begin) and tail [vec_end, end): fewer than kVec bytes each.
  const int64_t head = vec_begin - begin;
  for (int64_t k = threadIdx.x; k < head + (end - vec_end); k += blockDim.x) {
    const int64_t byte = k < head ? begin + k : vec_end + (k - head);
    const char value = src[byte];
    for (int c = 0; c < copies; ++c) {
      reinterpret_cast<char*>(meta.dst[c * n + i])[byte] = value;
    }
  }

  const Vec* src_vecs = reinterpret_cast<const Vec*>(src + vec_begin);
  for (int64_t k = threadIdx.x; k < num_vecs; k += kUnroll * blockDim.x) {
    Vec values[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (k + u * blockDim.x < num_vecs) values[u] = src_vecs[k + u * blockDim.x];
    }
    for (int c = 0; c < copies; ++c) {
      Vec* dst_vecs = reinterpret_cast<Vec*>(reinterpret_cast<char*>(meta.dst[c * n + i]) + vec_begin);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (k + u * blockDim.x < num_vecs) dst_vecs[k + u * blockDim.x] = values[u];
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
replicate_kernel(const int64_t* meta_array, int64_t n, int copies) {
  const Metadata meta(meta_array, n);
  const int64_t num_chunks = meta.chunk_starts[n];
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    // Binary search for the source owning this chunk, keeping
    // chunk_starts[lo] <= chunk < chunk_starts[hi] (so empty sources are never chosen).
    int64_t lo = 0, hi = n;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (meta.chunk_starts[mid] <= chunk) lo = mid; else hi = mid;
    }
    const int64_t i = lo;
    const char* src = reinterpret_cast<const char*>(meta.src[i]);
    const int64_t begin = (chunk - meta.chunk_starts[i]) * kChunkBytes;
    const int64_t end = min(begin + kChunkBytes, meta.nbytes[i]);

    // The widest vector (16 bytes down to 1) for which every destination's address is
    // congruent to the source's: views at odd offsets still copy correctly, just slower.
    uintptr_t differing_bits = 0;
    for (int c = 0; c < copies; ++c) {
      differing_bits |= meta.src[i] ^ meta.dst[c * n + i];
    }
    if ((differing_bits & 15) == 0) {
      copy_chunk<uint4>(src, meta, n, i, copies, begin, end);
    } else if ((differing_bits & 7) == 0) {
      copy_chunk<uint2>(src, meta, n, i, copies, begin, end);
    } else if ((differing_bits & 3) == 0) {
      copy_chunk<uint32_t>(src, meta, n, i, copies, begin, end);
    } else if ((differing_bits & 1) == 0) {
      copy_chunk<uint16_t>(src, meta, n, i, copies, begin, end);
    } else {
      copy_chunk<uint8_t>(src, meta, n, i, copies, begin, end);
    }
  }
}

}  // namespace

void replicate_cuda(const std::vector<at::Tensor>& sources, const CopyLists& destinations) {
  const int64_t n = static_cast<int64_t>(sources.size());
  const int64_t copies = static_cast<int64_t>(destinations.size());
  const c10::cuda::CUDAGuard device_guard(sources[0].device());

  // Built in pinned host memory so the upload is asynchronous; the caching host
  // allocator keeps the buffer alive until the copy on the current stream is done.
  at::Tensor meta = at::empty({3 * n + 1 + copies * n},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* chunk_starts = meta.data_ptr<int64_t>();
  int64_t* src = chunk_starts + n + 1;
  int64_t* nbytes = src + n;
  int64_t* dst = nbytes + n;
  chunk_starts[0] = 0;
  for (int64_t i = 0; i < n; ++i) {
    nbytes[i] = static_cast<int64_t>(sources[i].nbytes());
    src[i] = reinterpret_cast<int64_t>(sources[i].data_ptr());
    chunk_starts[i + 1] = chunk_starts[i] + (nbytes[i] + kChunkBytes - 1) / kChunkBytes;
    for (int64_t c = 0; c < copies; ++c) {
      dst[c * n + i] = reinterpret_cast<int64_t>(destinations[c][i].data_ptr());
    }
  }
  const int64_t num_chunks = chunk_starts[n];
  if (num_chunks == 0) {
    return;
  }
  const at::Tensor meta_device = meta.to(sources[0].device(), at::kLong, /*non_blocking=*/true);
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount,
                                        sources[0].device().index()));
  const int blocks = static_cast<int>(std::min(num_chunks, int64_t{sm_count} * kBlocksPerSm));
  replicate_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      meta_device.data_ptr<int64_t>(), n, static_cast<int>(copies));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace stackfast
