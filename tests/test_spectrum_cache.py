"""The FFT families reuse their kernels' spectra, Monarch its factors L' R', across calls that record no gradient
(surm.structures._reuse): outputs equal the uncached path's (bit for bit for the spectra; Monarch's factor form
against its blocks form to float64 rounding); any change of the parameters (in-place edit, optimizer step,
load_state_dict, dtype, device) is seen; nothing is cached while gradients are recorded or under torch.compile;
the cache holds O(parameters) numbers (spectra; Monarch's factors, N times its parameters), never a dense matrix."""

from __future__ import annotations

import pytest
import torch

import surm
from surm.structures._reuse import ParameterCache

#: The families whose fast apply transforms parameter-only kernels, with their non-default parameterisations.
CASES: list[tuple[str, dict]] = [
    ("circulant", {}), ("circulant", {"parameterization": "product"}),
    ("toeplitz", {}), ("toeplitz", {"parameterization": "product"}),
    ("symmetric_toeplitz", {}), ("symmetric_toeplitz", {"parameterization": "product"}),
    ("ldr", {}), ("ldr", {"displacement_rank": 2}),
    ("monarch", {"nblocks": 2, "block_rank": 2}), ("monarch", {"nblocks": 3, "block_rank": 1}),
]
SHAPES = [(12, 12), (7, 11), (13, 6)]


def make(name: str, options: dict, m: int, n: int) -> surm.StructuredMatrix:
    """A random matrix in eval mode (the mode in which spectra are reused)."""
    torch.manual_seed(0)
    return surm.structure(name, m, n, init="random", **options).double().eval()


def uncached(matrix: surm.StructuredMatrix, x: torch.Tensor) -> torch.Tensor:
    """The output of the path that transforms the kernels on every call (gradients recorded), detached."""
    with torch.enable_grad():
        return matrix(x).detach()


def cache_of(matrix: surm.StructuredMatrix) -> ParameterCache:
    """The matrix's one ParameterCache (the spectra of the FFT families, Monarch's factors)."""
    (cache,) = [value for value in vars(matrix).values() if isinstance(value, ParameterCache)]
    return cache


def cached_key(matrix: surm.StructuredMatrix) -> tuple | None:
    return cache_of(matrix)._key


def assert_same(got: torch.Tensor, expected: torch.Tensor, matrix: surm.StructuredMatrix) -> None:
    """Bit for bit where the cached value feeds the same operations (spectra); to float64 rounding for Monarch,
    whose reused factors are the factor form of the product the uncached few-token call computes by blocks."""
    if isinstance(matrix, surm.structures.Monarch):
        tight = {"rtol": 1e-12, "atol": 1e-12} if got.dtype == torch.float64 else {}  # float32: its defaults
        torch.testing.assert_close(got, expected, **tight)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("name,options", CASES, ids=lambda v: str(v))
def test_cached_outputs_equal_the_uncached_path(name, options, m, n):
    matrix = make(name, options, m, n)
    for shape in [(1, n), (3, 5, n), (0, n)]:
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            first, second = matrix(x), matrix(x)
        assert cached_key(matrix) is not None
        expected = uncached(matrix, x)
        assert_same(first, expected, matrix)
        assert torch.equal(first, second)
    with torch.inference_mode():
        x = torch.randn(2, n, dtype=torch.float64)
        got = matrix(x)
    assert_same(got, uncached(matrix, x.clone()), matrix)


@pytest.mark.parametrize("name,options", CASES, ids=lambda v: str(v))
def test_every_parameter_change_invalidates_the_spectra(name, options):
    matrix = make(name, options, 7, 11)
    x = torch.randn(3, 11, dtype=torch.float64)

    def check() -> None:
        with torch.no_grad():
            got = matrix(x)
        assert_same(got, uncached(matrix, x), matrix)

    check()
    with torch.no_grad():  # an in-place edit of one parameter
        list(matrix.parameters())[-1].add_(0.5)
    check()
    optimizer = torch.optim.SGD(matrix.parameters(), lr=0.1)  # an optimizer step
    matrix(x).square().sum().backward()
    optimizer.step()
    check()
    other = make(name, options, 7, 11)  # load_state_dict
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-2.0)
    matrix.load_state_dict(other.state_dict())
    check()
    matrix.float()  # a dtype change: the spectra are recomputed in float32
    x = x.float()
    check()
    assert cached_key(matrix)[0] == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,options", CASES, ids=lambda v: str(v))
def test_a_device_change_invalidates_the_spectra(name, options):
    matrix = make(name, options, 7, 11)
    x = torch.randn(3, 11, dtype=torch.float64)
    with torch.no_grad():
        matrix(x)
        matrix.cuda()
        got = matrix(x.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), uncached(matrix.cpu(), x))


def test_a_swapped_storage_is_seen_even_at_an_equal_version():
    matrix = make("circulant", {}, 8, 8)
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        matrix(x)
        matrix.column.data = torch.randn(8, dtype=torch.float64)
        got = matrix(x)
    assert torch.equal(got, uncached(matrix, x))


@pytest.mark.parametrize("name,options", CASES, ids=lambda v: str(v))
def test_nothing_is_cached_while_gradients_are_recorded(name, options):
    matrix = make(name, options, 7, 11)
    x = torch.randn(3, 11, dtype=torch.float64)
    y = matrix(x)
    assert y.grad_fn is not None and cached_key(matrix) is None
    matrix.requires_grad_(False)  # frozen matrix, but the input records: still no reuse
    y = matrix(x.requires_grad_())
    assert y.grad_fn is not None and cached_key(matrix) is None
    y = matrix(x.detach())  # frozen and a plain input: nothing records, reuse even in grad mode
    assert y.grad_fn is None and cached_key(matrix) is not None


@pytest.mark.parametrize("name,options", CASES, ids=lambda v: str(v))
def test_compiled_graphs_do_not_use_the_cache(name, options):
    matrix = make(name, options, 7, 11)
    x = torch.randn(3, 11, dtype=torch.float64)
    compiled = torch.compile(matrix, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x)
    assert cached_key(matrix) is None
    torch.testing.assert_close(got, uncached(matrix, x))
    torch._dynamo.reset()


@pytest.mark.parametrize("name,options", CASES, ids=lambda v: str(v))
def test_the_cache_holds_values_of_the_parameters_size(name, options):
    m, n = 64, 48
    matrix = make(name, options, m, n)
    with torch.no_grad():
        matrix(torch.randn(1, n, dtype=torch.float64))
    value = cache_of(matrix)._value
    held = sum(t.numel() for t in (value if isinstance(value, (list, tuple)) else [value]))
    if isinstance(matrix, surm.structures.Monarch):
        assert held <= matrix.nblocks * matrix.num_parameters()  # L' and R': N times the blocks' numbers, truncated
    else:
        assert held <= 4 * matrix.num_parameters() + 8  # complex numbers: rfft of length <= 2 * (m + n)
    assert held < m * n


def test_inference_tensor_parameters_are_not_cached():
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.inference_mode():
        matrix = make("circulant", {}, 8, 8)
        got = matrix(x)
    assert cached_key(matrix) is None
    assert torch.equal(got, uncached(make("circulant", {}, 8, 8), x))


@pytest.mark.parametrize("name,options", CASES, ids=lambda v: str(v))
def test_nothing_is_cached_in_training_mode_and_a_mode_switch_forgets(name, options):
    """Training mode never reuses; switching mode forgets (eval() in eval mode does not), so even an edit through
    .data made while training (which no version counter sees) is seen by the next eval call."""
    matrix = make(name, options, 7, 11)
    x = torch.randn(3, 11, dtype=torch.float64)
    with torch.no_grad():
        matrix(x)
    assert cached_key(matrix) is not None
    kept = cache_of(matrix)._value
    matrix.eval()  # already in eval mode (as a generation loop calls it): nothing switches, nothing is forgotten
    assert cache_of(matrix)._value is kept
    matrix.train()
    assert cached_key(matrix) is None
    with torch.no_grad():
        matrix(x)
    assert cached_key(matrix) is None
    for p in matrix.parameters():
        p.data.mul_(-3.0)  # bypasses the version counter
    matrix.eval()
    with torch.no_grad():
        got = matrix(x)
    assert_same(got, uncached(matrix, x), matrix)


def test_parameter_cache_rebuilds_only_on_change():
    p = torch.zeros(3)
    cache: ParameterCache[torch.Tensor] = ParameterCache()
    builds: list[int] = []

    def build() -> torch.Tensor:
        builds.append(1)
        return p * 2

    cache.get([p], "a", build)
    cache.get([p], "a", build)
    assert len(builds) == 1
    cache.get([p], "b", build)  # the extra key
    p.add_(1)  # the version
    assert torch.equal(cache.get([p], "b", build), torch.full((3,), 2.0))
    assert len(builds) == 3
