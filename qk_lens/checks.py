"""Argument checks shared by every public entry point.

Each raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, out of range) with
a message that names the argument, the value and what would be valid. Python, numpy and
one-element integer torch values count as ints; bools never do.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "as_int",
    "check_count",
    "check_fraction",
    "check_heads",
    "check_index",
    "check_int",
    "check_position",
    "check_positions",
    "is_int",
    "is_real",
    "renamed",
]


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python, numpy, or a one-element integer tensor)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite real number (not a bool)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def as_int(name: str, value: Any, what: str = "an int") -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return int(value)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An int in [low, high] (``high=None``: no upper bound)."""
    value = as_int(name, value)
    if value < low or (high is not None and value > high):
        valid = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value} is out of range: it must be {valid}")
    return value


def check_count(name: str, value: Any) -> int:
    """A positive int: how many items to return, a batch size, a top-k."""
    if not is_int(value) or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_index(name: str, value: Any, n: int, what: str) -> int:
    """An index into ``n`` things (a layer, a head)."""
    value = as_int(name, value)
    if not 0 <= value < n:
        raise ValueError(f"{name}={value} is out of range: this model has {n} {what} (0..{n - 1})")
    return value


def check_heads(value: Any, n_heads: int) -> list[int]:
    """An int or an iterable of ints, each a head index; sorted, unique."""
    items = [value] if is_int(value) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"heads must be an int or a list of ints, got {type(value).__name__}")
    out = []
    for h in items:
        if not is_int(h):
            raise TypeError(f"heads must hold ints, got {type(h).__name__}")
        h = int(h)
        if not 0 <= h < n_heads:
            raise ValueError(
                f"head {h} is out of range: this model has {n_heads} heads (0..{n_heads - 1})"
            )
        out.append(h)
    if not out:
        raise ValueError("heads is empty; give at least one head index")
    return sorted(set(out))


def check_position(name: str, value: Any, n_tokens: int) -> int:
    """A token position; negative positions count from the end."""
    value = as_int(name, value, "an int position")
    if not -n_tokens <= value < n_tokens:
        raise ValueError(
            f"{name}={value} is past the prompt, which has {n_tokens} tokens: valid positions are "
            f"0..{n_tokens - 1} (or -{n_tokens}..-1 from the end)"
        )
    return value % n_tokens


def check_positions(name: str, value: Any, n_tokens: int) -> list[int]:
    """None → every position; an int or an iterable of ints → those (sorted, unique)."""
    if value is None:
        return list(range(n_tokens))
    if is_int(value):
        return [check_position(name, value, n_tokens)]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be None, an int or a list of ints, got {type(value).__name__}"
        )
    out = sorted({check_position(name, p, n_tokens) for p in value})
    if not out:
        raise ValueError(f"{name} is empty; give at least one position, or None for all")
    return out


def check_fraction(name: str, value: Any) -> float:
    """A number in [0, 1] (a probability, a threshold)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def renamed(**old_to_new: str) -> Callable[[F], F]:
    """Decorator: keyword ``old=`` still works (for a release) as ``new=``, with a DeprecationWarning."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{fn.__qualname__}() got both {old}= and {new}=; use {new}="
                        )
                    warnings.warn(
                        f"{fn.__qualname__}({old}=...) is deprecated; use {new}=",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
