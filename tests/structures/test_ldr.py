"""LDR: displacement rank at most r for (Z_1, Z_{-1}); the skew-circulant factor; truncation to rectangles."""

from __future__ import annotations

import pytest
import torch

import surm
from surm.structures._fft import fast_fft_length
from surm.structures.ldr import skew_circulant_dense

from ..checks import assert_matches_dense


def shift(size: int, corner: float) -> torch.Tensor:
    """Z_f: ones below the diagonal, f in the top-right corner."""
    z = torch.diag(torch.ones(size - 1, dtype=torch.float64), -1)
    z[0, -1] = corner
    return z


def numerical_rank(matrix: torch.Tensor) -> int:
    singular = torch.linalg.svdvals(matrix)
    return int((singular > 1e-9 * singular[0]).sum())


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("size", [7, 8])
def test_displacement_rank_is_at_most_r(rank, size):
    torch.manual_seed(rank)
    module = surm.structure("ldr", size, size, displacement_rank=rank, init="random").double()
    dense = module.dense()
    displacement = shift(size, 1.0) @ dense - dense @ shift(size, -1.0)
    assert numerical_rank(displacement) <= rank  # the bound is 2r; the construction gives r
    assert numerical_rank(dense) == size  # yet M itself is full rank


def test_skew_circulant_commutes_with_its_shift_and_flips_sign_above_the_diagonal():
    s = torch.randn(6, dtype=torch.float64)
    skew = skew_circulant_dense(s)
    z = shift(6, -1.0)
    assert torch.allclose(z @ skew, skew @ z, atol=1e-12)
    assert torch.equal(skew[:, 0], s)
    assert skew[0, 1] == -s[5]
    assert torch.equal(skew[1:, 1], s[:-1])


def explicit_dense(module) -> torch.Tensor:
    """sum_i circ(c_i) Z_{-1}(s_i) written out (the circulant by its indices), cut to (m, n)."""
    size = module.size
    index = (torch.arange(size).unsqueeze(1) - torch.arange(size).unsqueeze(0)) % size
    total = sum(c[index] @ skew_circulant_dense(s) for c, s in zip(module.circulant_columns, module.skew_columns))
    return total[: module.out_features, : module.in_features]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(("m", "n"), [(12, 12), (13, 13), (13, 6), (6, 13), (43, 20), (20, 43), (688, 256)])
def test_dense_form_and_fast_apply_equal_the_products_written_out(rank, m, n):
    """dense() builds only the n columns of Z_{-1}(s_i) it needs (a tall M: n of N) and cuts Z_1(c_i)'s output to
    m rows; it is sum_i Z_1(c_i) Z_{-1}(s_i) written out and cut to (m, n), and the fast apply equals it in values and
    every gradient (float64; rows, one row, empty batches)."""
    torch.manual_seed(rank)
    module = surm.structure("ldr", m, n, displacement_rank=rank, init="random").double()
    with torch.no_grad():
        assert torch.allclose(module.dense(), explicit_dense(module), atol=1e-10)
    for batch in ((3, n), (n,), (0, n), (2, 0, n)):
        module.zero_grad()  # the check reads the gradients this call accumulates
        assert_matches_dense(module, torch.randn(batch, dtype=torch.float64))


@pytest.mark.parametrize(("m", "n"), [(5, 9), (10, 6), (13, 6)])
def test_rectangular_is_the_top_left_block_of_the_square(m, n):
    torch.manual_seed(0)
    module = surm.structure("ldr", m, n, displacement_rank=2, init="random").double()
    square = surm.structure("ldr", max(m, n), max(m, n), displacement_rank=2).double()
    square.load_state_dict(module.state_dict())
    assert torch.equal(module.dense(), square.dense()[:m, :n])


@pytest.mark.parametrize(("m", "n"), [(688, 256), (37, 5), (12, 12), (5, 37)])
def test_skew_convolution_is_as_short_as_the_input_allows_and_still_exact(m, n):
    """The linear convolution s * x has N + n - 1 values: a tall M transforms at that length (688 x 256: 960
    points, not 2N = 1376), and the fold z[:N] - z[N:2N] with the entries past L taken as zero is exact, values
    and gradients (float64, against the dense form, the batch of rows included)."""
    torch.manual_seed(0)
    module = surm.structure("ldr", m, n, displacement_rank=2, init="random").double()
    size = max(m, n)
    assert module._skew_length() == fast_fft_length(size + n - 1)
    assert module._skew_length() < 2 * size or n == size
    assert_matches_dense(module, torch.randn(3, n, dtype=torch.float64))


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize(("m", "n"), [(9, 9), (13, 6), (6, 13)])
@pytest.mark.parametrize("needs", ["x", "parameters", "both"])
def test_the_fused_apply_equals_the_dense_form_for_each_gradient_asked(rank, m, n, needs):
    """LowDisplacementApply computes only the gradients asked for (input only: frozen adapters; parameters only: the
    first layer's input), each equal to the dense form's in float64, with leading batch dimensions."""
    torch.manual_seed(rank)
    module = surm.structure("ldr", m, n, displacement_rank=rank, init="random").double()
    module.requires_grad_(needs != "x")
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=needs != "parameters")
    seed = torch.randn(2, 3, m, dtype=torch.float64)
    dense = module.dense()
    expected = x @ dense.T
    leaves = [t for t in (x, *module.parameters()) if t.requires_grad]
    got = torch.autograd.grad(module(x), leaves, seed)
    want = torch.autograd.grad(expected, leaves, seed)
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_a_second_derivative_is_refused_rather_than_wrong():
    """The backward keeps the folded terms' spectra, which a second derivative would have to differentiate too."""
    module = surm.structure("ldr", 8, 8, init="random").double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), module.skew_columns)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(("m", "n"), [(9, 9), (13, 6), (6, 13)])
def test_a_second_backward_and_an_eval_call_agree_with_the_first(rank, m, n):
    """The fused apply's saved tensors (x, the kernels, the folded terms' spectra) survive its backward: a second
    backward through the same graph (``retain_graph``) gives the same gradients, the input and parameters are
    unchanged, and a call recording nothing (eval) returns the recorded call's values, equal to the dense form's."""
    torch.manual_seed(rank)
    module = surm.structure("ldr", m, n, displacement_rank=rank, init="random").double()
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    before = [t.detach().clone() for t in (x, *module.parameters())]
    seed = torch.randn(2, 3, m, dtype=torch.float64)
    y = module(x)
    leaves = [x, *module.parameters()]
    first = torch.autograd.grad(y, leaves, seed, retain_graph=True)
    second = torch.autograd.grad(y, leaves, seed)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for tensor, copy in zip((x, *module.parameters()), before):
        torch.testing.assert_close(tensor.detach(), copy, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(module(x), y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.detach(), x.detach() @ module.dense().T, rtol=1e-10, atol=1e-10)
