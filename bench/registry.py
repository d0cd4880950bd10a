"""A name -> object registry with "did you mean" for unknown names.

Every pluggable family (topologies, algorithm components, presets, data sets,
models) is one Registry. A plug-in registers itself with the decorator when its
module is imported; the package __init__ imports every module of the package.
A registered class gets its name as the class attribute `name`.

Plug-ins outside the package: DSGDBENCH_PLUGINS=mod1,path/to/file.py (comma-separated
module names or .py files) is imported by the algorithms package after its own modules,
so `DSGDBENCH_PLUGINS=my_algo.py dsgdbench run --algo my-algo` needs no edit of the package.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
from typing import Callable, Generic, Iterator, TypeVar

from bench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind  # "topology", "algorithm", ... (used in messages)
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            if isinstance(obj, type):
                obj.name = name
            self._items[name] = obj
            self._help[name] = help or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(unknown_name(self.kind, name, self._items)) from None

    def unregister(self, name: str) -> None:
        self._items.pop(name)
        self._help.pop(name)

    def help(self, name: str) -> str:
        return self._help[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def unknown_name(kind: str, name: str, valid) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; valid: {', '.join(valid)}"


def import_submodules(package_name: str) -> None:
    """Import every module of a package, so that each registers itself."""
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")


def load_plugins(env: str = "DSGDBENCH_PLUGINS") -> list[str]:
    """Import the plug-ins named in the environment variable (module names or .py files)."""
    import os
    import sys

    loaded = []
    for ref in filter(None, (r.strip() for r in os.environ.get(env, "").split(","))):
        if ref.endswith(".py"):
            name = "dsgdbench_plugin_" + os.path.splitext(os.path.basename(ref))[0].replace("-", "_")
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, ref)
            if spec is None or not os.path.isfile(ref):
                raise UserError(f"{env}: plug-in file {ref!r} does not exist")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            try:
                importlib.import_module(ref)
            except ImportError as e:
                raise UserError(f"{env}: cannot import plug-in {ref!r} ({e})") from None
        loaded.append(ref)
    return loaded
