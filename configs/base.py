"""The base of every config section: strict (unknown keys are errors), typed, never mutating."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

_NUMBERS = (int, float)


class Section(BaseModel):
    """A config section. Unknown keys are errors; values are validated on assignment too.

    Non-finite floats (.inf, .nan) are refused, and so are a bool where a number is expected
    and a number or string where a bool is (pydantic's lax mode would read `true` as 1 and
    1 or "yes" as true)."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        validate_default=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is None:
            return value
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _wants_number_not_bool(annotation):
            raise ValueError(f"expected a number, got the bool {str(value).lower()}")
        if _wants_bool(annotation) and not isinstance(value, bool | None):  # lax: 1, "yes"
            raise ValueError(f"expected true or false, got {type(value).__name__} {value!r}")
        return value


def _wants_number_not_bool(annotation: Any) -> bool:
    """True for int, float and their optional/union forms that do not also allow a bool."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(annotation)
        return bool not in args and any(a in _NUMBERS for a in args)
    if origin is typing.Annotated:
        return _wants_number_not_bool(typing.get_args(annotation)[0])
    return annotation in _NUMBERS


def _wants_bool(annotation: Any) -> bool:
    """True for bool and bool | None."""
    return annotation is bool or set(typing.get_args(annotation)) == {bool, type(None)}
