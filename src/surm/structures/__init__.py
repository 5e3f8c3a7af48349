"""The structured families, registered by name, and :func:`structure` to build one."""

from __future__ import annotations

import inspect
from typing import Any

from .base import StructuredMatrix, declared_options
from .circulant import Circulant
from .fourier import Fourier
from .kronecker import Kronecker
from .ldr import LowDisplacementRank
from .lowrank import LowRank
from .monarch import Monarch
from .options import Option
from .symmetric_toeplitz import SymmetricToeplitz
from .toeplitz import Toeplitz

#: The constructor arguments every family has; the rest are its declared :attr:`StructuredMatrix.options`.
_COMMON_ARGUMENTS = ("out_features", "in_features", "init")


def checked_registry(families: dict[str, type[StructuredMatrix]]) -> dict[str, type[StructuredMatrix]]:
    """``families``, after checking each family's declarations against its constructor.

    Raises:
        TypeError: if a family's options differ from its constructor's keyword arguments (names, order, defaults),
            it lacks a positive ``default_lr``, or two families declare an option of the same name with other kinds.
    """
    kinds: dict[str, type] = {}
    for name, family in families.items():
        parameters = inspect.signature(family).parameters
        taken = [p for p in parameters if p not in _COMMON_ARGUMENTS]
        declared = [option.name for option in family.options]
        if taken != declared:
            raise TypeError(f"family {name!r} declares the options {declared}, but its constructor takes {taken}")
        for option in family.options:
            if parameters[option.name].default != option.default:
                raise TypeError(f"family {name!r}: option {option.name!r} declares the default {option.default!r}, "
                                f"the constructor has {parameters[option.name].default!r}")
            if kinds.setdefault(option.name, option.kind) is not option.kind:
                raise TypeError(f"option {option.name!r} of family {name!r} is of kind {option.kind.__name__}, "
                                f"another family's is of kind {kinds[option.name].__name__}")
        if not (isinstance(getattr(family, "default_lr", None), float) and family.default_lr > 0):
            raise TypeError(f"family {name!r} declares no positive default_lr")
    return families


#: Every family by the name users pass to :func:`structure` and ``SurmConfig(structure=...)``. A new family is one
#: module plus one line here; config fields, flags, the search space and the tests follow from its declarations.
STRUCTURES: dict[str, type[StructuredMatrix]] = checked_registry({
    "lowrank": LowRank,
    "circulant": Circulant,
    "toeplitz": Toeplitz,
    "symmetric_toeplitz": SymmetricToeplitz,
    "kronecker": Kronecker,
    "ldr": LowDisplacementRank,
    "monarch": Monarch,
    "fourier": Fourier,
})


def structure_options(name: str) -> tuple[str, ...]:
    """The options (keyword arguments besides the two sizes) that family ``name`` accepts, ``init`` last."""
    return (*(option.name for option in _family(name).options), "init")


def option_declarations() -> dict[str, dict[str, Option]]:
    """Every option name of any family -> {family: its declaration}, in registry order."""
    declarations: dict[str, dict[str, Option]] = {}
    for name, family in STRUCTURES.items():
        for option in family.options:
            declarations.setdefault(option.name, {})[name] = option
    return declarations


def search_space(name: str) -> dict[str, tuple[Any, ...]]:
    """The options ``surm search`` tries for family ``name``: option -> values (None: the family's default)."""
    return {option.name: option.search for option in _family(name).options if option.search}


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
    "Fourier",
    "Kronecker",
    "LowDisplacementRank",
    "LowRank",
    "Monarch",
    "Option",
    "StructuredMatrix",
    "SymmetricToeplitz",
    "Toeplitz",
    "checked_registry",
    "declared_options",
    "option_declarations",
    "search_space",
    "structure",
    "structure_options",
]
