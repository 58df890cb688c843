"""Rendering hooks: result objects get their HTML here, from renderers :mod:`qk_lens.views`
registers when it is imported (``import qk_lens`` imports it).

Results sit below the views in the package's layers (views format results, never the reverse),
so a result's ``report()`` / ``_repr_html_`` looks its renderer up by name when called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_RENDERERS: dict[str, Callable[..., Any]] = {}


def register(name: str) -> Callable[[F], F]:
    """Decorator: make ``fn`` the renderer called ``name``."""

    def decorate(fn: F) -> F:
        _RENDERERS[name] = fn
        return fn

    return decorate


def render(name: str, *args: Any, **kwargs: Any) -> Any:
    """Call the renderer registered as ``name``."""
    try:
        fn = _RENDERERS[name]
    except KeyError:
        raise RuntimeError(
            f"no renderer {name!r} is registered; import qk_lens.views (import qk_lens does)"
        ) from None
    return fn(*args, **kwargs)
