"""Package build. Metadata lives in pyproject.toml; this file adds the compiled extension.

Two optional extension modules carry `stackfast.ops.replicate_`:
- `stackfast._C`: the C++ CPU kernel, built wherever a C++ compiler is found.
- `stackfast._C_cuda`: the CPU and CUDA kernels, built when the installed torch has CUDA
  and nvcc is found. STACKFAST_BUILD_CUDA=0 skips it; STACKFAST_BUILD_CUDA=1 requires it
  (a failure is then an error). It targets Ampere (sm_80) and Hopper (sm_90) unless
  TORCH_CUDA_ARCH_LIST says otherwise.
A failed optional build is one warning: the package still installs and replicate_ uses
its PyTorch fallback.

torch is not a build requirement: the extension must be compiled against the very torch
it will run with, and an isolated build environment would download its own (a bare
`torch` requirement pulls a multi-GB CUDA build, whose ABI need not match the user's).
So `pip install .` (build isolation, no torch in the build environment) builds the
pure-Python package, and `pip install --no-build-isolation .` (or `-e .`) builds the
extension against the torch already installed. `stackfast info` says which one is there.
"""
import os
import subprocess
import sys

from setuptools import setup
from setuptools.errors import CompileError

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # an isolated build: no extension, the PyTorch fallback runs
    torch = None

CXX_FLAGS = ["-O3", "-fopenmp"]  # at::parallel_for is OpenMP in torch's CPU builds
CPU_SOURCES = ["csrc/replicate.cpp", "csrc/bindings.cpp"]
HEADERS = ["csrc/replicate.h"]  # rebuild when it changes


def extensions():
    modules = [CppExtension("stackfast._C", CPU_SOURCES, extra_compile_args=CXX_FLAGS,
                            extra_link_args=["-fopenmp"], depends=HEADERS, optional=True)]
    build_cuda = os.environ.get("STACKFAST_BUILD_CUDA")
    forced = build_cuda == "1"
    if forced or (build_cuda != "0" and torch.version.cuda is not None and CUDA_HOME is not None):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        modules.append(CUDAExtension(
            "stackfast._C_cuda", CPU_SOURCES + ["csrc/replicate_cuda.cu"],
            define_macros=[("STACKFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"], depends=HEADERS, optional=not forced))
    return modules


if torch is None:
    print("stackfast: torch is not importable in this build environment, so the C++/CUDA extension is "
          "skipped (replicate_ uses its PyTorch fallback); `pip install --no-build-isolation .` builds it "
          "against the installed torch", file=sys.stderr)
    setup()
else:
    class OptionalBuildExtension(BuildExtension):
        """Turns a failed compile of an optional extension into setuptools' warning.

        torch's ninja build raises RuntimeError (and a missing compiler OSError), which
        setuptools would not treat as a build error; CompileError makes it honour `optional`.
        """

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
                raise CompileError(str(error)) from error

    setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExtension})
