"""Deprecated names: each warns once per process (DeprecationWarning), then keeps working."""
from __future__ import annotations

import functools
import warnings


@functools.cache
def warn_renamed(old: str, new: str) -> None:
    """Warns that `old` is now `new`; functools.cache makes it once per (old, new)."""
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def renamed_attributes(module_name: str, renames: dict[str, tuple[str, object]]):
    """A module `__getattr__` serving old names: {old: (new name, object)}."""

    def __getattr__(name: str):
        if name in renames:
            new, value = renames[name]
            warn_renamed(f"{module_name}.{name}", f"{module_name}.{new}")
            return value
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
