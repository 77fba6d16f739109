"""Names of a package loaded on first use (PEP 562): one helper for every package that keeps heavy
imports (torch) off the paths that do not need them (``kneeosteo.inference``, ``kneeosteo.models``).

A package's ``__init__`` says where each public name lives and gets its module ``__getattr__``
and ``__dir__`` from :func:`lazy_names`::

    __getattr__, __dir__ = lazy_names(__name__, globals(), {"Predictor": "kneeosteo.inference.predictor"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_names(
    package: str, namespace: dict, where: dict[str, str], first: str | None = None
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name of ``where`` (name -> module) is imported
    from its module on first use and kept in ``namespace`` (the package's globals), so the next use
    costs nothing; ``first``: a module imported before any name is taken (e.g. a registry's entries);
    any other name is the usual AttributeError."""

    def getattr_(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if first is not None:
            importlib.import_module(first)
        value = getattr(importlib.import_module(where[name]), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(where))

    return getattr_, dir_
