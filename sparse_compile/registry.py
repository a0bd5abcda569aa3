"""The registry of attention methods, and the typed method configs ``options`` validates with.

Methods register their class with :func:`register_method` when :mod:`sparse_compile.methods`
is imported (the package imports it); :mod:`sparse_compile.options` looks them up here, so it
never imports the methods themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, TypeVar

METHODS: dict[str, type] = {}
"""Method name -> its ``AttentionMethod`` subclass (registered by :func:`register_method`)."""

MethodClass = TypeVar("MethodClass", bound=type)


def register_method(cls: MethodClass) -> MethodClass:
    """Class decorator: make ``cls`` selectable as ``method=cls.name``."""
    METHODS[cls.name] = cls
    return cls


def option(default: Any, check: Callable[[Any], bool], allowed: str) -> Any:
    """A config field: its default, the check its value must pass, and the allowed values in words."""
    return field(default=default, metadata={"check": check, "allowed": allowed})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fraction_option(default: float) -> Any:
    """A number in (0, 1]."""
    return option(default, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")


def unit_interval_option(default: float) -> Any:
    """A number in [0, 1]."""
    return option(default, lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")


def int_option(default: int, minimum: int) -> Any:
    return option(default, lambda v: _is_int(v) and v >= minimum, f"an int >= {minimum}")


def choice_option(default: int, choices: tuple[int, ...]) -> Any:
    """One of a few ints (e.g. block sizes)."""
    return option(default, lambda v: _is_int(v) and v in choices, f"one of {', '.join(map(str, choices))}")


def bool_option(default: bool) -> Any:
    return option(default, lambda v: isinstance(v, bool), "True or False")


def steps_option() -> Any:
    """``None``, or a list/tuple of step indices (ints >= 0), kept as a tuple."""
    return option(
        None,
        lambda v: v is None or (isinstance(v, (list, tuple)) and all(_is_int(s) and s >= 0 for s in v)),
        "None or a list/tuple of ints >= 0",
    )


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options: a frozen dataclass whose fields are :func:`option` s.

    Each field is checked once, at construction; a bad value raises ``ValueError`` naming the
    option, the method and what is allowed. Lists are stored as tuples (configs are hashable).
    """

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not f.metadata["check"](value):
                raise ValueError(
                    f"sparse_video option {f.name!r} of method {config_owner(type(self))!r} must be "
                    f"{f.metadata['allowed']}, got {value!r}"
                )
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def config_owner(config_type: type[MethodConfig]) -> str:
    """The name of the registered method whose config type this is."""
    for name, cls in METHODS.items():
        if cls.config_type is config_type:
            return name
    raise LookupError(f"{config_type.__name__} is not the config of a registered method")

