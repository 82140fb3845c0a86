"""Import-time stand-ins for packages that a machine lacks (the lent GPU machine has torch but
neither torchrec nor fbgemm_gpu). They let ``import torchrec_tt`` load there so that the TT
convolution, which uses neither, can be built, tested and benchmarked: every submodule of a
stubbed package imports and every name in it is a placeholder class that raises when called.
The embedding side of torchrec_tt does NOT work with them. Used only through
``PYTHONPATH=tools/torchrec_stub`` when ``import torchrec`` fails (bench/gpu_conv_session.sh).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any


class _Meta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{cls.__module__} is not installed (tools/torchrec_stub placeholder)")


class Placeholder(metaclass=_Meta):
    pass


def _module_getattr(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return Placeholder


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix + "."

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname.startswith(self.prefix):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        mod = types.ModuleType(spec.name)
        mod.__path__ = []  # type: ignore[attr-defined]
        mod.__getattr__ = _module_getattr  # type: ignore[attr-defined]
        return mod

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        pass


def install(name: str, namespace: dict[str, Any]) -> None:
    """Makes package `name` (whose __init__ calls this) a stub: any attribute, any submodule."""
    namespace["__getattr__"] = _module_getattr
    sys.meta_path.insert(0, _StubFinder(name))
