"""Checks of user-given values, shared by every configuration (models, training, plans).

Every error says what was wrong, the value given and what is allowed, in one form:
``<what> <name>=<value> is invalid; allowed: <allowed>``, where ``what`` names the kind of
setting (``config field``, ``training option``, ``plan field``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def invalid(what: str, name: str, value: Any, allowed: str) -> ValueError:
    """The error for a bad value: ``<what> <name>=<value> is invalid; allowed: <allowed>``."""
    return ValueError(f"{what} {name}={value!r} is invalid; allowed: {allowed}")


def check(obj: Any, name: str, ok: Callable[[Any], bool], allowed: str, what: str = "config field") -> None:
    """Raise :func:`invalid` unless ``ok(obj.name)``."""
    value = getattr(obj, name)
    if not ok(value):
        raise invalid(what, name, value, allowed)


def check_option(name: str, value: Any, ok: Callable[[Any], bool], allowed: str) -> None:
    """Raise :func:`invalid` for a command's option ``--name`` unless ``ok(value)``."""
    if not ok(value):
        raise invalid("option", f"--{name}", value, allowed)


def is_text(value: Any) -> bool:
    """A string that is valid Unicode text (command-line bytes that are not UTF-8 arrive as lone surrogates)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_positive_ints(obj: Any, names: tuple[str, ...], what: str = "config field") -> None:
    for name in names:
        check(obj, name, lambda v: is_int(v) and v >= 1, "a positive integer", what)


def check_divides(obj: Any, divisor: str, total: str, what: str = "config field") -> None:
    d, t = getattr(obj, divisor), getattr(obj, total)
    if t % d:
        raise invalid(what, divisor, d, f"a divisor of {total}={t}")


def check_choice(obj: Any, name: str, allowed: tuple[str, ...], what: str = "config field") -> None:
    check(obj, name, lambda v: v in allowed, ", ".join(allowed), what)


def lookup_preset(presets: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """A preset's fields by case-insensitive name; an unknown name lists the allowed ones."""
    lowered = {key.lower(): values for key, values in presets.items()}
    if not isinstance(name, str) or name.lower() not in lowered:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(presets)}")
    return lowered[name.lower()]


# Keys by which config loaders (jsonargparse, Lightning, Hydra's _target_) name code to import.
CODE_KEYS = ("class_path", "init_args", "_target_")


def names_code(value: Any) -> bool:
    """Whether ``value`` (or anything inside it) is a mapping that names code to import."""
    if isinstance(value, dict):
        return any(key in CODE_KEYS for key in value) or any(names_code(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(names_code(v) for v in value)
    return False


def check_plain_data(data: dict[str, Any], what: str) -> None:
    """Refuse a config whose values name code to import: a config holds plain data only."""
    for name, value in data.items():
        if names_code(value):
            allowed = f"plain data: numbers, strings, true/false, null, lists and mappings (no {', '.join(CODE_KEYS)})"
            raise invalid(what, name, value, allowed)


def dataclass_from_dict(cls: type[T], data: dict[str, Any], what: str) -> T:
    """``cls(**data)``, with unknown keys named in the error instead of a bare TypeError, and
    values that name code to import refused (:func:`check_plain_data`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{what}s must be a mapping of names to values, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; allowed: {sorted(known)}")
    check_plain_data(data, what)
    return cls(**data)
