"""Old names kept as deprecated aliases: a module's ``__getattr__`` (PEP 562) that warns and returns the new
object, so ``from peftkern import inject_adapters`` keeps working for a while and says what to use instead."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping


def deprecated_aliases(namespace: Mapping[str, object], renamed: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` serving ``renamed`` (old name -> new name) from ``namespace`` (the module's
    ``globals()``), with a ``DeprecationWarning`` naming the replacement."""
    module = namespace["__name__"]

    def __getattr__(name: str) -> object:
        if name in renamed:
            new = renamed[name]
            warnings.warn(
                f"{module}.{name} is deprecated: it is {module}.{new} now (the bottleneck-adapter API; "
                "'adapter' alone means a LoRA adapter, as in load_adapter and AdapterPool)",
                DeprecationWarning,
                stacklevel=2,
            )
            return namespace[new]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
