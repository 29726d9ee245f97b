// Thin Python binding: argument checks and dispatch live in replicate.cpp.
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "replicate.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("replicate_", &stackfast::replicate_, pybind11::arg("sources"),
        pybind11::arg("destinations"),
        // Copies can take seconds on CPU: let other Python threads run meanwhile.
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Copy sources[i] into destinations[c][i] for every copy c, reading each source once.");
}
