"""PEP 562 lazy package exports: a package's public names resolve on first access, so packages whose submodules
import each other (``rlt_pl.modules`` and ``rlt_pl.callbacks``) can be imported in either order."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`, for `exports` (name → defining module)."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> object:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
