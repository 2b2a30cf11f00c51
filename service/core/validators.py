"""Validated number types shared by optimizer and schedule specs.

`interval(lo, hi)` refuses values outside a range with a message that names the rule:
`must be in [0, 1): got 1.2`; the spec's error handling prefixes the field
(`betas[0] must be in [0, 1): got 1.2`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, Strict
from pydantic_core import PydanticCustomError


def _fmt(x: float) -> str:
    return f"{x:g}"


def interval(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> AfterValidator:
    """A validator that refuses values outside `[lo, hi]` (ends open as asked)."""

    def check(value: float) -> float:
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            if lo is not None and hi is not None:
                rule = (
                    f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
                )
            elif lo is not None:
                rule = f"{'>' if lo_open else '>='} {_fmt(lo)}"
            else:
                rule = f"{'<' if hi_open else '<='} {_fmt(hi if hi is not None else 0.0)}"
            raise PydanticCustomError(
                "out_of_range", "must be {rule}: got {value}", {"rule": rule, "value": value}
            )
        return value

    return AfterValidator(check)


#: specs are validated strictly (`SPEC_CONFIG`): a number must be a JSON number (an int
#: is fine for a float), a flag a JSON boolean; "0.1" or 0 for False are refused. Pairs
#: such as `betas` accept a JSON list, their elements stay strict.
#: a number >= 0 (learning rates, eps, weight decay, ...)
NonNeg = Annotated[float, interval(0.0)]
#: a number > 0
Positive = Annotated[float, interval(0.0, lo_open=True)]
#: a decay rate in [0, 1) (Adam's betas, torch's check)
Beta = Annotated[float, Strict(), interval(0.0, 1.0, hi_open=True)]
#: a fraction in [0, 1]
UnitInterval = Annotated[float, Strict(), interval(0.0, 1.0)]
#: `betas`: two decay rates, from a list or a tuple
BetaPair = Annotated[tuple[Beta, Beta], Field(strict=False)]
#: two fractions in [0, 1] (Lion's betas)
UnitPair = Annotated[tuple[UnitInterval, UnitInterval], Field(strict=False)]
#: a whole number >= 1 / >= 0
PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
