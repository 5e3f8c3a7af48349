"""The structured families, registered by name, and :func:`structure` to build one."""

from __future__ import annotations

import inspect
from typing import Any

from .base import StructuredMatrix
from .circulant import Circulant
from .kronecker import Kronecker
from .ldr import LowDisplacementRank
from .lowrank import LowRank
from .monarch import Monarch
from .symmetric_toeplitz import SymmetricToeplitz
from .toeplitz import Toeplitz

#: Every family by the name users pass to :func:`structure` (and later to ``SurmConfig(structure=...)``).
STRUCTURES: dict[str, type[StructuredMatrix]] = {
    "lowrank": LowRank,
    "circulant": Circulant,
    "toeplitz": Toeplitz,
    "symmetric_toeplitz": SymmetricToeplitz,
    "kronecker": Kronecker,
    "ldr": LowDisplacementRank,
    "monarch": Monarch,
}


def structure_options(name: str) -> tuple[str, ...]:
    """The options (keyword arguments besides the two sizes) that family ``name`` accepts."""
    parameters = inspect.signature(_family(name)).parameters
    return tuple(p for p in parameters if p not in ("out_features", "in_features"))


def structure(name: str, out_features: int, in_features: int, **options: Any) -> StructuredMatrix:
    """Build the structured matrix M of family ``name`` with shape (out_features, in_features).

    Args:
        name: one of :data:`STRUCTURES`.
        out_features: m, the rows of M (the output size of ``forward``).
        in_features: n, the columns of M (the input size of ``forward``).
        **options: family options (see each family's docstring), e.g. ``rank``, ``nblocks``,
            ``block_rank``, ``factors``, ``displacement_rank``, ``parameterization``, ``init``.

    Returns:
        An ``nn.Module`` whose ``forward`` is the fast apply of M, with ``dense()`` and ``num_parameters()``.

    Raises:
        ValueError: for an unknown family or option, or an option value that cannot fit the shape.
    """
    family = _family(name)
    valid = structure_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for structure {name!r}; valid options: {list(valid)}")
    return family(out_features, in_features, **options)


def _family(name: str) -> type[StructuredMatrix]:
    try:
        return STRUCTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown structure {name!r}; valid structures: {sorted(STRUCTURES)}") from None


__all__ = [
    "STRUCTURES",
    "Circulant",
    "Kronecker",
    "LowDisplacementRank",
    "LowRank",
    "Monarch",
    "StructuredMatrix",
    "SymmetricToeplitz",
    "Toeplitz",
    "structure",
    "structure_options",
]
