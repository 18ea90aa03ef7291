"""The base of every configuration section (frozen, unknown keys refused) and the value types the sections
share; apart from ``schema.py`` so that a section kept in a module of its own (``keys.py``) can build on them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads `true` as 1; a number written as a boolean is a mistake.
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    return value


def _one_or_many(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


Count = Annotated[int, BeforeValidator(_not_bool)]
Seconds = Annotated[float, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool)]
# A list of names; one name may be written without the list.
Names = Annotated[tuple[str, ...], BeforeValidator(_one_or_many)]


class Section(BaseModel):
    """Frozen, unknown keys refused; a number is read as a string where a string is expected."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        # `server:` or `backends:` with everything under it commented out reads as null: its default.
        if not isinstance(data, Mapping):
            return data
        fields = cls.model_fields
        return {
            k: v for k, v in data.items()
            if v is not None or k not in fields or not _is_container(fields[k].default, fields[k].default_factory)
        }


def _is_container(default: Any, factory: Any) -> bool:
    return factory is not None or isinstance(default, tuple)
