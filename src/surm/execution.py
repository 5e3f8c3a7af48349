"""How a delta adapter applies M: the structured path or the dense path, chosen per layer by a cost model.

Two ways to compute ``s · M x`` for T tokens:

* **structured**: the family's fast apply on every token (FFTs, small or batched products); work grows with
  T · (n log n) or T · (parameters per row);
* **dense**: materialise ``dense(M)`` once per call (work independent of T; its backward maps the gradient of the
  dense matrix back onto the parameters, e.g. sums along diagonals for Toeplitz) and multiply by it. Inside a
  :class:`~surm.peft.layer.SurmLayer` the product is *folded* into the one the base layer does anyway,
  ``F.linear(x, W0 + s · dense(M), b)``, so its only per-token cost is the weight-gradient product when training;
  a standalone :class:`~surm.insertion.DeltaUpdate` multiplies separately.

``execution="auto"`` compares the two costs, in seconds from :data:`RATES`, for the actual token count, layer
shape, device, whether a backward pass is needed and whether the call may reuse what was derived from the
parameters alone (eval-mode calls without gradients: generation; the family's spectra or factors, a small layer's
folded weight), and takes the cheaper; ``"structured"`` and
``"dense"`` force a path. Both paths compute the same matrix product (they agree to float rounding; the tests check
float64).

The cost of each path is the work the family reports (:meth:`~surm.structures.StructuredMatrix.structured_cost`,
:meth:`~surm.structures.StructuredMatrix.dense_cost`) weighted by per-kind rates measured on the reference CPU
(see :data:`RATES`). Only ratios between the rates matter for the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .structures.base import Cost, StructuredMatrix, operator_calls

Execution = Literal["auto", "structured", "dense"]
EXECUTIONS: tuple[str, ...] = ("auto", "structured", "dense")
PATHS: tuple[str, ...] = ("structured", "dense")


@dataclass(frozen=True)
class DeviceRates:
    """Throughput of each kind of work on a device, in units of :class:`~surm.structures.base.Cost` per second."""

    gemm: float
    small_gemm: float
    fft: float
    elementwise: float
    calls: float

    def seconds(self, cost: Cost) -> float:
        """Estimated time of ``cost`` on this device."""
        return (
            cost.gemm / self.gemm
            + cost.small_gemm / self.small_gemm
            + cost.fft / self.fft
            + cost.elementwise / self.elementwise
            + cost.calls / self.calls
        )


#: Rates per device type, float32, fitted by ``benchmarks/path_rates.py`` to the adapter's *added* time inside a
#: frozen Linear (forward + backward, and forward alone), every family at its default options with each path forced,
#: over LLM and MiniLM projection shapes and 1 to 8192 tokens (docs/results/path_rates_{cpu,cuda}.md), rather than
#: to isolated kernels (in a layer they also pay padding, complex products and cache misses).
#:
#: CPU: the reference machine's 2 threads (AMD EPYC, AVX2, PyTorch 2.13 with MKL and pocketfft), 448 measured paths:
#: large products ~140 GFLOP/s, thin products ~80 GFLOP/s of ``thin_flops`` units, FFTs ~1.0e10 n log2 n per second,
#: elementwise passes ~5.4e9 numbers per second, and ~16 us per operator call. With these ``auto`` takes the faster
#: path in 402 of 448 cases and loses 7.6 ms in all to the faster choice (the rates before, which counted no calls:
#: 369, 16.8 ms); with each shape left out of its own fit, 402 and 7.6 ms.
#:
#: CUDA: an NVIDIA H200 driven by 2 threads of a Xeon host (PyTorch 2.11, CUDA 13), 700 measured paths: large
#: products ~44 TFLOP/s, FFTs ~1.1e13, elementwise ~3.4e11 per second, and ~40 us per operator call: at these
#: shapes the calls, not the work, decide almost everything. Thin products cost nothing measurable next to their
#: calls (the fit gives them no time; 1e18 stands for that). ``auto`` takes the faster path in 303 of 350 cases, and
#: loses 5.8 ms in all to the faster choice (the uncalibrated rates before, which counted no calls: 178 of 350,
#: 59.9 ms lost); with each shape left out of its own fit, 294 and 11.1 ms.
RATES: dict[str, DeviceRates] = {
    "cpu": DeviceRates(gemm=1.4e11, small_gemm=8.1e10, fft=1.05e10, elementwise=5.4e9, calls=6.4e4),
    "cuda": DeviceRates(gemm=4.4e13, small_gemm=1e18, fft=1.1e13, elementwise=3.4e11, calls=2.5e4),
}


#: Largest matrix (numbers) the dense path keeps between eval-mode calls that record no gradient (generation,
#: evaluation): 2**18, 1 MiB in float32. A layer keeps its folded weight ``W0 + s · dense(M)`` (such a call then costs
#: the base product alone, with nothing besides it), and a matrix applied on its own keeps ``s · dense(M)`` (an
#: adapter-mode map, a delta that cannot fold: one product per call, in place of its family's transforms); a small
#: layer is where per-call work dominates (one generated token). A layer of a large model (hidden 2048: 4M numbers
#: and more) keeps nothing, so the memory added stays at most one copy of the small adapted matrices.
#: ``execution="structured"`` keeps nothing anywhere.
KEPT_DENSE_MAX_NUMBERS = 2**18

#: Operator calls of the update around the family's own, (forward, backward), as PyTorch dispatches them (the scale
#: s rides on a product): the structured path adds s · M x to the base output and passes the gradient back through
#: the sum; the folded dense path adds s · dense(M) to W0 (its backward, the weight gradient of the base product,
#: takes the place of operators the family's own count already holds); the separate dense path multiplies x by
#: s · dense(M), and its backward computes both gradients of that product and accumulates them.
STRUCTURED_CALLS: tuple[int, int] = (1, 2)
FOLD_CALLS: tuple[int, int] = (1, 0)
SEPARATE_DENSE_CALLS: tuple[int, int] = (1, 4)
#: A kept s · dense(M) applied on its own (:data:`KEPT_DENSE_MAX_NUMBERS`): its product and the sum with the output.
KEPT_SEPARATE_CALLS: tuple[int, int] = (2, 0)


def check_execution(execution: object) -> str:
    """Return ``execution`` if it is one of :data:`EXECUTIONS`, else raise a ValueError naming the valid values."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    return execution  # type: ignore[return-value]


def keeps_dense(matrix: StructuredMatrix) -> bool:
    """Whether the dense path keeps ``matrix``'s dense form (or the weight it is folded into) between calls that may
    reuse it: at most :data:`KEPT_DENSE_MAX_NUMBERS` numbers."""
    return matrix.out_features * matrix.in_features <= KEPT_DENSE_MAX_NUMBERS


def path_costs(
    matrix: StructuredMatrix, tokens: int, *, folded: bool, backward: bool, reused: bool = False
) -> dict[str, Cost]:
    """The work of each path for applying ``matrix`` to ``tokens`` rows (arguments as :func:`path_seconds`)."""
    if reused and backward:
        raise ValueError("reused values apply only to calls that record no gradient (backward=False)")
    m, n = matrix.out_features, matrix.in_features
    dense = matrix.dense_cost(backward)
    if reused and keeps_dense(matrix):
        # Folded: the kept W0 + s · dense(M) takes the base weight's place in the base product. On its own: the kept
        # s · dense(M) times x, added to the output.
        dense = Cost() if folded else Cost(gemm=2 * tokens * m * n, elementwise=tokens * m) + operator_calls(
            *KEPT_SEPARATE_CALLS, False)
    elif folded:
        # s · dense(M) added to W0 (and the sum's gradient passed back); the product itself is the base layer's,
        # its weight gradient (one product, the weight's first) is the path's own.
        dense = dense + Cost(elementwise=(2 if backward else 1) * 2 * m * n, gemm=2 * tokens * m * n if backward else 0)
        dense = dense + operator_calls(*FOLD_CALLS, backward)
    else:
        dense = dense + Cost(gemm=(3 if backward else 1) * 2 * tokens * m * n, elementwise=m * n + tokens * m)
        dense = dense + operator_calls(*SEPARATE_DENSE_CALLS, backward)
    structured = matrix.structured_cost(tokens, backward, reused=reused) + operator_calls(*STRUCTURED_CALLS, backward)
    return {"structured": structured, "dense": dense}


def path_seconds(
    matrix: StructuredMatrix, tokens: int, *, folded: bool, backward: bool, reused: bool = False,
    device_type: str = "cpu",
) -> dict[str, float]:
    """Estimated seconds of each path for applying ``matrix`` to ``tokens`` rows.

    Args:
        matrix: M, of shape (m, n).
        tokens: rows of x (every leading dimension multiplied out).
        folded: True if the dense path can fold ``s · dense(M)`` into the base layer's weight (one product for
            both), False if it multiplies separately.
        backward: True if a backward pass follows (training): the dense path then pays the weight-gradient
            product, the structured path its own backward.
        reused: True for an eval-mode call that records no gradient (generation, evaluation): the structured path
            then takes the values its family derives from the parameters alone (FFT spectra, Monarch's factors)
            from their cache instead of computing them (:mod:`surm.structures._reuse`); the dense path of a matrix
            with at most :data:`KEPT_DENSE_MAX_NUMBERS` numbers keeps what it built: folded, ``W0 + s · dense(M)``,
            which costs nothing besides the base product; on its own, ``s · dense(M)``, which costs one product;
            elsewhere the dense path keeps nothing and builds dense(M) per call.
        device_type: ``"cpu"``, ``"cuda"``; other types use the CUDA rates.

    Returns:
        ``{"structured": seconds, "dense": seconds}``.
    """
    rates = RATES.get(device_type, RATES["cuda"])
    costs = path_costs(matrix, tokens, folded=folded, backward=backward, reused=reused)
    return {path: rates.seconds(cost) for path, cost in costs.items()}


def choose_path(
    execution: str, matrix: StructuredMatrix, tokens: int, *, folded: bool, backward: bool, reused: bool = False,
    device_type: str = "cpu",
) -> str:
    """The path to take: ``execution`` itself if it forces one, else the cheaper by :func:`path_seconds`.

    With no rows (``tokens=0``, an empty batch) ``"auto"`` takes the structured path: it does no work at all, where
    the dense path would still build dense(M).

    Raises:
        ValueError: if ``tokens`` is negative, or ``reused`` is asked with ``backward``.
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0 (the rows of x), got {tokens!r}")
    if execution != "auto":
        return execution
    if tokens == 0:
        return "structured"
    seconds = path_seconds(matrix, tokens, folded=folded, backward=backward, reused=reused, device_type=device_type)
    return "dense" if seconds["dense"] < seconds["structured"] else "structured"
