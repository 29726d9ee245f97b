// C++ test of the replication kernels without Python (run by CTest; see CMakeLists.txt).
// The thorough grid lives in tests/test_replicate.py; this checks that the library
// built by CMake copies exactly and rejects bad arguments.
#include <iostream>
#include <string>

#include <ATen/ATen.h>

#include "replicate.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

// Random bytes viewed as `dtype` (bool stays 0/1), `offset` elements into a buffer so
// that the data is not 16-byte aligned.
at::Tensor random_view(int64_t numel, at::ScalarType dtype, int64_t offset, at::Device device) {
  const int64_t itemsize = c10::elementSize(dtype);
  at::Tensor buffer = dtype == at::kBool
      ? at::randint(0, 2, {numel + offset}).to(at::kBool)
      : at::randint(0, 256, {(numel + offset) * itemsize}, at::kByte).view(dtype);
  return buffer.to(device).narrow(0, offset, numel);
}

void test_copies(at::Device device) {
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf, at::kLong, at::kByte, at::kBool}) {
    std::vector<at::Tensor> sources;
    for (int64_t numel : {0, 1, 7, 4097, 1 << 20}) {
      sources.push_back(random_view(numel, dtype, numel % 3, device));
    }
    stackfast::CopyLists destinations(3);  // g = 4
    for (size_t c = 0; c < destinations.size(); ++c) {
      for (const at::Tensor& source : sources) {
        destinations[c].push_back(random_view(source.numel(), dtype, c, device));
      }
    }
    stackfast::replicate_(sources, destinations);
    for (const auto& copies : destinations) {
      for (size_t i = 0; i < sources.size(); ++i) {
        expect(at::equal(copies[i].view(at::kByte), sources[i].view(at::kByte)),
               "copy of " + std::string(c10::toString(dtype)) + " tensor " + std::to_string(i) +
                   " on " + device.str());
      }
    }
  }
}

void expect_error(const std::vector<at::Tensor>& sources, const stackfast::CopyLists& destinations,
                  const std::string& message) {
  try {
    stackfast::replicate_(sources, destinations);
    expect(false, "no error, expected: " + message);
  } catch (const c10::Error& error) {
    const std::string what = error.what_without_backtrace();
    expect(what.find(message) != std::string::npos, "error '" + what + "' lacks '" + message + "'");
  }
}

void test_errors() {
  const at::Tensor a = at::zeros({4, 6});
  expect_error({a}, {{a.to(at::kDouble)}}, "destinations[0][0] has dtype Double but sources[0] has dtype Float");
  expect_error({a}, {{a.clone()}, {at::zeros({6, 4})}}, "destinations[1][0] has shape [6, 4]");
  expect_error({a.t()}, {{a.t().clone()}}, "sources[0] is not contiguous");
  expect_error({a}, {{at::zeros({6, 4}).t()}}, "destinations[0][0] is not contiguous");
  expect_error({a}, {{a}}, "destinations[0][0] overlaps sources[0]");
  expect_error({a, a}, {{a.clone()}}, "destinations[0] holds 1 tensors but sources holds 2");
}

}  // namespace

int main() {
  test_copies(at::kCPU);
#ifdef STACKFAST_WITH_CUDA
  if (at::hasCUDA()) {
    test_copies(at::kCUDA);
  }
#endif
  test_errors();
  std::cout << (failures == 0 ? "all replicate_ checks passed\n" : "replicate_ checks failed\n");
  return failures == 0 ? 0 : 1;
}
