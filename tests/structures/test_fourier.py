"""The sparse-spectrum family (FourierFT's update): the dense form against the cosine sum written out, the frequencies
it draws, and its size option."""

from __future__ import annotations

import math

import pytest
import torch

import surm
from surm.structures import fourier
from surm.structures.fourier import distinct_frequencies, drawn_frequencies

from .cases import HUGE, SHAPES, assert_refused_quickly


def cosine_sum(coefficients: torch.Tensor, frequencies, m: int, n: int) -> torch.Tensor:
    """sqrt(2 / (m n)) * sum_k s_k cos(2 pi (r_k i / m + c_k j / n)), entry by entry."""
    i = torch.arange(m, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    total = torch.zeros(m, n, dtype=torch.float64)
    for s, (r, c) in zip(coefficients.tolist(), frequencies):
        total += s * torch.cos(2 * math.pi * (r * i / m + c * j / n))
    return total * math.sqrt(2.0 / (m * n))


def brute_force_distinct(m: int, n: int) -> int:
    return len({min((r, c), ((-r) % m, (-c) % n)) for r in range(m) for c in range(n)})


@pytest.mark.parametrize("m, n", [*SHAPES, (1, 1), (1, 6), (5, 1), (2, 2), (16, 384)])
def test_dense_form_is_the_cosine_sum_and_the_fast_apply_agrees(m, n):
    torch.manual_seed(0)
    count = min(7, distinct_frequencies(m, n))
    module = surm.structure("fourier", m, n, frequencies=count, init="random").double()
    expected = cosine_sum(module.coefficients.detach(), drawn_frequencies(m, n, count), m, n)
    torch.testing.assert_close(module.dense().detach(), expected, rtol=0, atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(module(x).detach(), x @ expected.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m, n", [(7, 7), (8, 6), (5, 9), (1, 4), (2, 2)])
def test_every_distinct_cosine_can_be_drawn_and_together_they_are_independent(m, n):
    """The count is the brute-force number of classes {(r, c), (-r, -c)}; drawing all of them gives distinct
    representatives whose cosines are linearly independent (no two parameters move M the same way)."""
    count = distinct_frequencies(m, n)
    assert count == brute_force_distinct(m, n)
    frequencies = drawn_frequencies(m, n, count)
    assert len(set(frequencies)) == count
    assert all((r, c) <= ((-r) % m, (-c) % n) for r, c in frequencies)
    basis = torch.stack([cosine_sum(torch.eye(count, dtype=torch.float64)[k], frequencies, m, n).flatten()
                         for k in range(count)])
    assert torch.linalg.matrix_rank(basis) == count


def test_frequencies_are_fixed_by_the_shape_and_nest_by_count():
    """Recomputed, never stored: the same shape and count give the same frequencies in a new module, and a larger
    count starts with the smaller one's."""
    first = surm.structure("fourier", 12, 18, frequencies=20)
    second = surm.structure("fourier", 12, 18, frequencies=20)
    for (name, buffer), (_, again) in zip(first.named_buffers(), second.named_buffers(), strict=True):
        assert torch.equal(buffer, again), name
    assert drawn_frequencies(40, 30, 50)[:10] == drawn_frequencies(40, 30, 10)
    assert list(first.state_dict()) == ["coefficients"]


def test_rank_grows_with_the_frequencies_drawn_up_to_full():
    """Each frequency adds a rank-2 cosine, on the row frequencies +-r it brings: 128 numbers make a 48 x 64 update of
    full rank (a LoRA of rank 1 costs 112), 24 make one of rank <= 48 = 2 K."""
    torch.manual_seed(0)
    ranks = {}
    for count in (24, 128):
        module = surm.structure("fourier", 48, 64, frequencies=count, init="random").double()
        ranks[count] = int(torch.linalg.matrix_rank(module.dense().detach()))
    assert ranks[128] == 48 and 1 < ranks[24] <= 48


def test_zero_init_is_the_zero_matrix_with_a_gradient():
    module = surm.structure("fourier", 10, 6).double()
    assert torch.count_nonzero(module.dense()) == 0
    x = torch.randn(4, 6, dtype=torch.float64)
    module(x).square().sum().backward()  # zero output: zero gradient too; use a linear loss instead
    module.zero_grad()
    (module(x) * torch.randn(4, 10, dtype=torch.float64)).sum().backward()
    assert torch.count_nonzero(module.coefficients.grad) > 0


@pytest.mark.parametrize("frequencies, match", [
    (HUGE, r"fourier frequencies=100000000 exceeds the 110 distinct frequencies of a 12 x 18 matrix; valid: 1..110"),
    (0, "frequencies must be a positive integer"),
])
def test_a_count_beyond_the_distinct_frequencies_is_refused_before_allocating(frequencies, match):
    assert_refused_quickly(lambda: surm.structure("fourier", 12, 18, frequencies=frequencies), match)


def test_the_default_count_never_exceeds_what_a_thin_shape_has():
    assert surm.structure("fourier", 1, 5).num_parameters() == distinct_frequencies(1, 5) == 3


@pytest.mark.parametrize("m, n", [(8, 6), (9, 7), (12, 18), (1, 6), (5, 1)])
def test_the_gather_scatter_form_equals_the_sparse_products(m, n, monkeypatch):
    """Where sparse kernels are not used (under torch.compile, on other devices) the fast apply gathers, weights and
    scatters the bins instead: the same values and gradients as the sparse (CSR) products, float64, including shapes
    where two frequencies share a position of P (their entries add)."""
    torch.manual_seed(0)
    module = surm.structure("fourier", m, n, init="random").double()
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, m, dtype=torch.float64)
    results = []
    for sparse in (True, False):
        monkeypatch.setattr(fourier, "_sparse_kernels", lambda like, sparse=sparse: sparse)
        y = module(x)
        results.append((y, *torch.autograd.grad((y * weights).sum(), [x, module.coefficients])))
        with torch.no_grad():
            results.append((module(x),))
    for fast, other in zip(results[:2], results[2:]):
        for a, b in zip(fast, other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][0], x @ module.dense().T, rtol=0, atol=1e-12)


def test_frequencies_sharing_a_position_are_covered():
    """(8, 6) has two frequencies at the same (output bin, input bin): the tests above exercise the added entries."""
    module = surm.structure("fourier", 8, 6)
    assert module.spectral_col.numel() < 2 * module.frequencies
