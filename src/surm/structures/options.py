"""Family options: how a family declares them (:class:`Option`), and the checks its constructor runs on them.

Errors name the value and what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..validation import is_int, require_positive_int

#: The kinds of value an option takes: an integer, a string, or a pair of positive integers.
KINDS = (int, str, tuple)


@dataclass(frozen=True)
class Option:
    """One keyword argument of a family's constructor (besides the sizes and ``init``), declared on the family class.

    Everything outside the family derives from these declarations: the ``SurmConfig`` field of the same name, the
    ``surm finetune`` flag, ``surm search``'s space and the per-family tests.

    Attributes:
        name: the keyword argument.
        kind: ``int``, ``str`` or ``tuple`` (a pair of positive integers, ``m1,n1`` on the command line).
        default: the constructor's default; None means the family chooses from the shape.
        help: what the option means, for the config and the command-line help.
        choices: the valid values of a ``str`` option.
        search: the values ``surm search`` tries (None among them: the default); empty if it is not searched.
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    search: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TypeError(f"option {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    def check_type(self, value: Any, where: str = "") -> Any:
        """``value`` if it has this option's kind (a pair as a tuple), else a ValueError naming it and what is valid.

        Only the kind and the choices are checked here; ranges that depend on a layer's shape are checked when the
        family is built.
        """
        prefix = f"{where}: " if where else ""
        if self.kind is int and not is_int(value):
            raise ValueError(f"{prefix}{self.name} must be a positive integer or None, got {value!r}")
        if self.kind is tuple:
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_int, value))):
                raise ValueError(f"{prefix}{self.name} must be None or a pair [m1, n1] of positive integers, "
                                 f"got {value!r}")
            return tuple(value)
        if self.kind is str and (not isinstance(value, str) or (self.choices and value not in self.choices)):
            raise ValueError(f"{prefix}{self.name} must be one of {list(self.choices)}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """The value of the command-line text ``text`` (``"4"``, ``"product"``, ``"4,8"``).

        Raises:
            ValueError: naming the option and the expected form.
        """
        try:
            if self.kind is int:
                return int(text)
            if self.kind is tuple:
                first, second = (int(v) for v in text.split(","))
                return (first, second)
        except ValueError:
            form = "an integer" if self.kind is int else "two integers 'm1,n1'"
            raise ValueError(f"--{self.flag} takes {form}, got {text!r}") from None
        return text

    def format(self, value: Any) -> str:
        """The command-line text of ``value`` (the inverse of :meth:`parse`)."""
        return ",".join(str(v) for v in value) if self.kind is tuple else str(value)

    @property
    def flag(self) -> str:
        """The command-line flag, without its dashes: ``block-rank`` for ``block_rank``."""
        return self.name.replace("_", "-")


#: The option of the circulant and Toeplitz families that switches to the SURM code's product forms.
Parameterization = Literal["plain", "product"]
PARAMETERIZATION = Option("parameterization", str, "plain", "'plain': the structure's own numbers are the "
                          "parameters; 'product': SURM's product form (see the family)", choices=("plain", "product"),
                          search=("plain", "product"))


def require_size_option(family: str, name: str, value: object, out_features: int, in_features: int) -> int:
    """Return ``value`` if it is an integer in 1..N, N = max(out_features, in_features), else raise a ValueError.

    For the size options that multiply a family's parameters (a rank, a number of terms, a block rank): beyond N
    they cannot make M express anything more, only bigger (a 16 x 16 lowrank of rank 10**8 would allocate 12.6 GB),
    so families check this before allocating anything.
    """
    require_positive_int(name, value)
    limit = max(out_features, in_features)
    if value > limit:  # type: ignore[operator]
        raise ValueError(f"{family} {name}={value} exceeds max(out_features, in_features)={limit}; valid: 1..{limit}")
    return value  # type: ignore[return-value]


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def divisor_nearest_sqrt(n: int) -> int:
    """The divisor d of n that is closest to sqrt(n) (the smaller one on a tie), which balances d and n / d."""
    return min(divisors(n), key=lambda d: (abs(d * d - n), d))
