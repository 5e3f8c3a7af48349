"""The circular convolution behind circulant, Toeplitz and LDR: its autograd against the dense circulant, once and
twice differentiated, and the in-place spectral products it makes when nothing asks for a second derivative."""

from __future__ import annotations

import pytest
import torch

from surm.structures._fft import circular_convolution, convolve_spectrum

#: (kernel shape, x shape, length): one kernel for a batch, a batch of kernels broadcast over x, x broadcast over
#: kernels (LDR's terms), odd and padded lengths, an empty batch.
CASES = [((5,), (3, 5), 5), ((4,), (2, 3, 6), 9), ((2, 1, 7), (3, 7), 7), ((3, 4), (2, 1, 4), 8), ((6,), (0, 6), 6)]


def operands(kernel_shape, x_shape):
    generator = torch.Generator().manual_seed(0)
    kernel = torch.randn(kernel_shape, dtype=torch.float64, generator=generator, requires_grad=True)
    x = torch.randn(x_shape, dtype=torch.float64, generator=generator, requires_grad=True)
    return kernel, x


def dense_convolution(kernel, x, length):
    """circ_L(kernel) pad_L(x) by the dense circulant: C[i, j] = c[(i - j) mod L]."""
    column = torch.nn.functional.pad(kernel, (0, length - kernel.shape[-1]))
    index = (torch.arange(length)[:, None] - torch.arange(length)[None, :]) % length
    padded = torch.nn.functional.pad(x, (0, length - x.shape[-1]))
    return (column[..., index] @ padded.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize(("kernel_shape", "x_shape", "length"), CASES)
def test_values_and_gradients_equal_the_dense_circulants(kernel_shape, x_shape, length):
    kernel, x = operands(kernel_shape, x_shape)
    probe = torch.randn(torch.broadcast_shapes(kernel_shape[:-1], x_shape[:-1]) + (length,), dtype=torch.float64)
    fast = circular_convolution(kernel, x, length)
    fast_grads = torch.autograd.grad((fast * probe).sum(), (kernel, x), allow_unused=True)
    dense = dense_convolution(kernel, x, length)
    dense_grads = torch.autograd.grad((dense * probe).sum(), (kernel, x))
    torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)
    for got, want in zip(fast_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kernel_shape", "x_shape", "length"), CASES[:4])
def test_second_derivatives_pass_gradgradcheck(kernel_shape, x_shape, length):
    kernel, x = operands(kernel_shape, x_shape)
    assert torch.autograd.gradgradcheck(lambda k, v: circular_convolution(k, v, length), (kernel, x))


@pytest.mark.parametrize(("kernel_shape", "x_shape", "length"), CASES)
def test_in_place_backward_equals_the_recorded_one(kernel_shape, x_shape, length):
    """backward() without create_graph multiplies in place; with it, out of place (so that it can be differentiated
    again): the gradients are the same numbers."""
    kernel, x = operands(kernel_shape, x_shape)
    probe = torch.randn(torch.broadcast_shapes(kernel_shape[:-1], x_shape[:-1]) + (length,), dtype=torch.float64)
    (circular_convolution(kernel, x, length) * probe).sum().backward()
    in_place = (kernel.grad, x.grad)
    recorded = torch.autograd.grad((circular_convolution(kernel, x, length) * probe).sum(), (kernel, x),
                                   create_graph=True)
    for got, want in zip(in_place, recorded):
        torch.testing.assert_close(got, want.detach(), rtol=1e-13, atol=1e-13)


def test_a_spectrum_product_in_place_leaves_its_operands_alone():
    x = torch.randn(4, 6, dtype=torch.float64)
    spectrum = torch.fft.rfft(torch.randn(6, dtype=torch.float64), n=8)
    x_before, spectrum_before = x.clone(), spectrum.clone()
    in_place = convolve_spectrum(spectrum, x, 8)
    assert torch.equal(x, x_before) and torch.equal(spectrum, spectrum_before)
    torch.testing.assert_close(in_place, torch.fft.irfft(spectrum * torch.fft.rfft(x, n=8), n=8), rtol=0, atol=0)
    wider = torch.fft.rfft(torch.randn(3, 1, 6, dtype=torch.float64), n=8)  # broadcasts x: a new tensor
    assert convolve_spectrum(wider, x, 8).shape == (3, 4, 8)


def test_mixed_precision_operands_multiply_at_the_wider_precision():
    """A float64 kernel on float32 inputs (and the reverse): the products are not made in place in the narrower
    operand's spectrum, so backward() gives the numbers of the out-of-place products (create_graph's path)."""
    for kernel_dtype, x_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        generator = torch.Generator().manual_seed(0)
        kernel = torch.randn(5, generator=generator).to(kernel_dtype).requires_grad_()
        x = torch.randn(3, 5, generator=generator).to(x_dtype).requires_grad_()
        circular_convolution(kernel, x, 8).square().sum().backward()
        recorded = torch.autograd.grad(circular_convolution(kernel, x, 8).square().sum(), (kernel, x),
                                       create_graph=True)
        for got, want in zip((kernel.grad, x.grad), recorded):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want.detach(), rtol=1e-13, atol=1e-13)
