"""Import the `anthropic` SDK without the ~2,000 modules the runner never touches.

`import anthropic` executes package `__init__` files that eagerly import every API type
(beta, admin, …) and the aiohttp transport: about 88 MB of RSS for an idle agent. Here
those re-export packages (`anthropic`, `anthropic.types*`, `anthropic.resources*`) are
loaded lazily: each name they re-export is imported on first use (PEP 562), so only
what the Messages API path needs is loaded; the optional aiohttp transport is reported
missing, which the SDK handles itself. The same classes, fewer of them (~60 MB).

Anything unexpected (a new SDK layout) falls back to the plain import, logged; set
NANOCLAW_LAZY_IMPORTS=0 to skip the shim.
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger("agent_runner")

LAZY = ("anthropic.types", "anthropic.resources")
BLOCKED = ("anthropic._vendor.httpx_aiohttp",)


def _reexports(path: str) -> dict[str, tuple[str | None, str]]:
    """name → (relative submodule or None for `from . import x`, attribute)."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    table: dict[str, tuple[str | None, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                if alias.name != "*":
                    table[alias.asname or alias.name] = (node.module, alias.name)
    return table


class _LazyPackage(importlib.abc.Loader):
    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        name = module.__name__
        table = _reexports(module.__spec__.origin)  # type: ignore[union-attr]

        def __getattr__(attr: str) -> Any:
            if attr in table:
                sub, real = table[attr]
                value = (importlib.import_module(f"{name}.{real}") if sub is None
                         else getattr(importlib.import_module(f"{name}.{sub}"), real))
            else:
                try:
                    value = importlib.import_module(f"{name}.{attr}")
                except ImportError:
                    raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None
            setattr(module, attr, value)
            return value

        module.__getattr__ = __getattr__  # type: ignore[attr-defined]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name in BLOCKED:
            raise ImportError(f"{name} is not needed by the agent runner")
        if name != "anthropic" and not name.startswith(LAZY):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.submodule_search_locations is None or not spec.origin:
            return None
        spec.loader = _LazyPackage()
        return spec


def import_anthropic() -> ModuleType:
    """The `anthropic` module; the finder stays installed, since subpackages the SDK
    reaches later (while streaming) must load lazily too."""
    if "anthropic" in sys.modules or os.environ.get("NANOCLAW_LAZY_IMPORTS") == "0":
        return importlib.import_module("anthropic")
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        module = importlib.import_module("anthropic")
        for name in ("Anthropic", "APIStatusError", "APIConnectionError", "AnthropicError"):
            getattr(module, name)
        return module
    except Exception as exc:  # a changed SDK layout: take the plain, heavier import
        log.warning("lazy import of anthropic failed (%s); importing it whole", exc)
        for name in [m for m in sys.modules if m == "anthropic" or m.startswith("anthropic.")]:
            del sys.modules[name]
        sys.meta_path.remove(finder)
        return importlib.import_module("anthropic")
