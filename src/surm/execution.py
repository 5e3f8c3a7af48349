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
shape, device and whether a backward pass is needed, and takes the cheaper; ``"structured"`` and ``"dense"`` force
a path. Both paths compute the same matrix product (they agree to float rounding; the tests check float64).

The cost of each path is the work the family reports (:meth:`~surm.structures.StructuredMatrix.structured_cost`,
:meth:`~surm.structures.StructuredMatrix.dense_cost`) weighted by per-kind rates measured on the reference CPU
(see :data:`RATES`). Only ratios between the rates matter for the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .structures.base import Cost, StructuredMatrix

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

    def seconds(self, cost: Cost) -> float:
        """Estimated time of ``cost`` on this device."""
        return (
            cost.gemm / self.gemm
            + cost.small_gemm / self.small_gemm
            + cost.fft / self.fft
            + cost.elementwise / self.elementwise
        )


#: Rates per device type. CPU: one thread of the reference machine (AMD EPYC, AVX2, PyTorch 2.13 with MKL and
#: pocketfft), float32, fitted to the adapter's *added* time inside a layer (the "paths" table of ``surm bench``,
#: 384 x 384, 2048 tokens, docs/results/bench_cpu.md) rather than to isolated kernels: a large product ~83 GFLOP/s;
#: thin products ~12 GFLOP/s at thinnest dimension 16 (see ``thin_flops``); FFTs ~3.6e9 n log2 n per second
#: (isolated kernels run twice as fast; in a layer they also pay padding, complex products and cache misses);
#: elementwise passes ~1.4e9 numbers per second (complex products count two). With more threads every kind speeds
#: up by a similar factor, so the choice hardly depends on the thread count. CUDA: not calibrated (no GPU on the
#: reference machine); the values encode only that large products run near peak and FFTs, thin products and
#: elementwise passes are memory-bound.
RATES: dict[str, DeviceRates] = {
    "cpu": DeviceRates(gemm=83e9, small_gemm=12e9, fft=3.6e9, elementwise=1.4e9),
    "cuda": DeviceRates(gemm=40e12, small_gemm=4e12, fft=5e11, elementwise=5e11),
}


def check_execution(execution: object) -> str:
    """Return ``execution`` if it is one of :data:`EXECUTIONS`, else raise a ValueError naming the valid values."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    return execution  # type: ignore[return-value]


def path_costs(matrix: StructuredMatrix, tokens: int, *, folded: bool, backward: bool) -> dict[str, Cost]:
    """The work of each path for applying ``matrix`` to ``tokens`` rows (arguments as :func:`path_seconds`)."""
    m, n = matrix.out_features, matrix.in_features
    dense = matrix.dense_cost(backward)
    if folded:
        # s · dense(M) added to W0 (and the sum's gradient passed back); the product itself is the base layer's.
        dense = dense + Cost(elementwise=(2 if backward else 1) * 2 * m * n, gemm=2 * tokens * m * n if backward else 0)
    else:
        dense = dense + Cost(gemm=(3 if backward else 1) * 2 * tokens * m * n, elementwise=m * n + tokens * m)
    return {"structured": matrix.structured_cost(tokens, backward), "dense": dense}


def path_seconds(
    matrix: StructuredMatrix, tokens: int, *, folded: bool, backward: bool, device_type: str = "cpu"
) -> dict[str, float]:
    """Estimated seconds of each path for applying ``matrix`` to ``tokens`` rows.

    Args:
        matrix: M, of shape (m, n).
        tokens: rows of x (every leading dimension multiplied out).
        folded: True if the dense path can fold ``s · dense(M)`` into the base layer's weight (one product for
            both), False if it multiplies separately.
        backward: True if a backward pass follows (training): the dense path then pays the weight-gradient
            product, the structured path its own backward.
        device_type: ``"cpu"``, ``"cuda"``; other types use the CUDA rates.

    Returns:
        ``{"structured": seconds, "dense": seconds}``.
    """
    rates = RATES.get(device_type, RATES["cuda"])
    costs = path_costs(matrix, tokens, folded=folded, backward=backward)
    return {path: rates.seconds(cost) for path, cost in costs.items()}


def choose_path(
    execution: str, matrix: StructuredMatrix, tokens: int, *, folded: bool, backward: bool, device_type: str = "cpu"
) -> str:
    """The path to take: ``execution`` itself if it forces one, else the cheaper by :func:`path_seconds`.

    With no rows (``tokens=0``, an empty batch) ``"auto"`` takes the structured path: it does no work at all, where
    the dense path would still build dense(M).

    Raises:
        ValueError: if ``tokens`` is negative.
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0 (the rows of x), got {tokens!r}")
    if execution != "auto":
        return execution
    if tokens == 0:
        return "structured"
    seconds = path_seconds(matrix, tokens, folded=folded, backward=backward, device_type=device_type)
    return "dense" if seconds["dense"] < seconds["structured"] else "structured"
