"""replicate_: exact copies for every dtype, size, alignment and g, on the compiled
extension and on the PyTorch fallback, and the same clear errors on both.

The suite assumes the install built the CPU extension (`pip install --no-build-isolation
-e .` or `python setup.py build_ext --inplace`); test_cpu_extension_is_built says so
plainly when it did not. The CUDA cases run only where a GPU is present.
"""
import pytest
import torch

from stackfast.ops import replicate as replicate_module
from stackfast.ops.replicate import extension_info, replicate_, replicate_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


@pytest.fixture(params=["extension", "fallback"])
def path(request, monkeypatch):
    """Runs a test once through the compiled extension and once through the fallback."""
    if request.param == "fallback":
        monkeypatch.setenv("STACKFAST_NO_EXTENSION", "1")
    return request.param


def random_tensor(numel, dtype, device="cpu", generator=None):
    """Random bytes, so NaN payloads and every bit pattern must survive the copy."""
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=generator).bool().to(device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    data = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    return data.view(dtype).to(device)


def assert_copies(sources, destinations):
    for copies in destinations:
        for source, destination in zip(sources, copies):
            assert destination.shape == source.shape
            assert torch.equal(destination.view(torch.uint8), source.view(torch.uint8))


def empty_copies(sources, g):
    return [[torch.empty_like(s) for s in sources] for _ in range(g - 1)]


def test_cpu_extension_is_built():
    assert extension_info()["cpu"], "stackfast._C is not built: run `pip install " \
        "--no-build-isolation -e .` or `python setup.py build_ext --inplace`"


def test_extension_info_reports_both_parts():
    assert set(extension_info()) == {"cpu", "cuda"}
    assert all(isinstance(v, bool) for v in extension_info().values())


def test_environment_variable_forces_fallback(monkeypatch):
    monkeypatch.setenv("STACKFAST_NO_EXTENSION", "1")
    assert replicate_module._extension_for(torch.device("cpu")) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [0, 1, 7, 4097])
def test_every_dtype_and_size(path, device, dtype, numel):
    sources = [random_tensor(numel, dtype, device), random_tensor(numel, dtype, device).view(-1, 1)]
    destinations = empty_copies(sources, g=4)
    assert replicate_(sources, destinations) is None
    assert_copies(sources, destinations)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("offsets", [(3, 3, 3), (3, 0, 5), (1, 2, 4), (0, 8, 16), (5, 13, 7)])
def test_views_at_odd_offsets(path, device, dtype, offsets):
    """Source and copies at unrelated alignments: vector loads must not assume any."""
    numel = 4097
    buffers = [random_tensor(numel + 32, dtype, device) for _ in offsets]
    source, *copies = [buf[o:o + numel] for buf, o in zip(buffers, offsets)]
    replicate_([source], [[copy] for copy in copies])
    assert_copies([source], [[copy] for copy in copies])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("g", range(2, 9))
def test_many_tensors_every_factor(path, device, g):
    generator = torch.Generator().manual_seed(g)
    numels = torch.randint(0, 5000, (50,), generator=generator).tolist()
    # Two tensors larger than the CPU kernel's 256 KiB thread grain and 64 KiB block.
    numels[10], numels[40] = 300_001, 1 << 18
    sources = [random_tensor(n, DTYPES[i % len(DTYPES)], device, generator)
               for i, n in enumerate(numels)]
    destinations = empty_copies(sources, g)
    replicate_(sources, destinations)
    assert_copies(sources, destinations)


@pytest.mark.parametrize("sources, destinations", [([], []), ([], [[], []]),
                                                   ([torch.ones(3)], [])])
def test_nothing_to_copy(path, sources, destinations):
    replicate_(sources, destinations)


def test_matches_reference_and_bumps_versions(path):
    """Same result as the copy_ loop; in-place semantics even for leaves that need grad."""
    sources = [torch.randn(5, 3), torch.randn(11)]
    destinations = [[torch.zeros(5, 3, requires_grad=True), torch.zeros(11)] for _ in range(3)]
    expected = [[d.detach().clone() for d in copies] for copies in destinations]
    replicate_ref(sources, expected)
    versions = [d._version for copies in destinations for d in copies]
    replicate_(sources, destinations)
    assert all(torch.equal(a, b) for x, y in zip(destinations, expected) for a, b in zip(x, y))
    assert all(d._version > v for d, v in zip((d for c in destinations for d in c), versions))


def bad_arguments():
    """(sources, destinations, error, message) for every rule the boundary checks."""
    buf = torch.zeros(20)
    ok = torch.zeros(4, 6)
    return {
        "dtype": ([ok, ok], [[ok.clone(), ok.double()]], RuntimeError,
                  r"destinations\[0\]\[1\] has dtype .* but sources\[1\] has dtype"),
        "shape": ([ok], [[ok.clone()], [torch.zeros(6, 4)]], RuntimeError,
                  r"destinations\[1\]\[0\] has shape \[6, 4\] but sources\[0\] has shape \[4, 6\]"),
        "source not contiguous": ([ok, ok.t()], [[ok.clone(), ok.t().clone()]], RuntimeError,
                                  r"sources\[1\] is not contiguous"),
        "copy not contiguous": ([ok], [[torch.zeros(6, 4).t()]], RuntimeError,
                                r"destinations\[0\]\[0\] is not contiguous"),
        "copy is source": ([ok], [[ok]], RuntimeError, r"destinations\[0\]\[0\] overlaps sources\[0\]"),
        "partial overlap": ([buf[:10]], [[torch.zeros(10)], [buf[9:19]]], RuntimeError,
                            r"destinations\[1\]\[0\] overlaps sources\[0\]"),
        "ragged": ([ok, ok], [[ok.clone(), ok.clone()], [ok.clone()]], ValueError,
                   r"destinations\[1\] holds 1 tensors but sources holds 2"),
        "not a tensor": ([ok, 3.0], [], TypeError, r"sources\[1\] is a float, not a tensor"),
        "copy not a tensor": ([ok], [[None]], TypeError, r"destinations\[0\]\[0\] is a NoneType"),
        "copies not lists": ([ok], [ok.clone()], TypeError, r"destinations\[0\] is a Tensor"),
    }


@pytest.mark.parametrize("case", list(bad_arguments()))
def test_clear_errors(path, case):
    sources, destinations, error, message = bad_arguments()[case]
    with pytest.raises(error, match=message):
        replicate_(sources, destinations)


def test_empty_views_never_overlap(path):
    buf = torch.zeros(20)
    replicate_([buf[2:2]], [[buf[2:2]], [buf[1:1]]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch(path):
    on_gpu = torch.zeros(4, device="cuda")
    with pytest.raises(RuntimeError, match=r"sources\[1\] is on cpu but sources\[0\] is on cuda"):
        replicate_([on_gpu, torch.zeros(4)], [])
    with pytest.raises(RuntimeError, match=r"destinations\[0\]\[0\] is on cpu but sources\[0\]"):
        replicate_([on_gpu], [[torch.zeros(4)]])


def strided_views():
    """(sources, destinations, message) with one non-contiguous tensor each: replicate_ copies
    bytes, so it refuses views instead of copying them wrongly (or writing through an expand)."""
    wide, ok = torch.zeros(4, 10), torch.zeros(4, 6)
    return {
        "sliced-row source": ([wide[:, :6]], [[ok.clone()]], r"sources\[0\] is not contiguous"),
        "expanded source": ([torch.zeros(1, 6).expand(4, 6)], [[ok.clone()]], r"sources\[0\] is not contiguous"),
        "sliced-row copy": ([ok], [[wide[:, 2:8]]], r"destinations\[0\]\[0\] is not contiguous"),
        "expanded copy": ([ok], [[ok.clone()], [torch.zeros(1, 6).expand(4, 6)]],
                          r"destinations\[1\]\[0\] is not contiguous"),
        "transposed copy": ([ok], [[torch.zeros(6, 4).t()]], r"destinations\[0\]\[0\] is not contiguous"),
    }


@pytest.mark.parametrize("case", list(strided_views()))
def test_strided_views_are_refused(path, case):
    sources, destinations, message = strided_views()[case]
    before = [[d.clone() for d in copies] for copies in destinations]
    with pytest.raises(RuntimeError, match=message):
        replicate_(sources, destinations)
    assert all(torch.equal(a, b) for x, y in zip(destinations, before) for a, b in zip(x, y))  # nothing written


def test_empty_tensors_of_any_shape(path):
    """Zero elements in any shape (no tokens, no layers): nothing to copy, no error; a contiguous
    row slice (a view at an offset) is copied like any tensor."""
    sources = [torch.zeros(0, 5), torch.zeros(3, 0, 2), torch.randn(6, 4)[2:5]]
    destinations = empty_copies(sources, g=3)
    replicate_(sources, destinations)
    assert_copies(sources, destinations)
