"""Import-time stand-in for torchrec, for machines that lack it (the lent GPU machine has torch
but no torchrec). It lets ``import torchrec_tt`` load there so that the TT convolution, which does
not use torchrec, can be built, tested and benchmarked: every ``torchrec.*`` module imports and
every name in it is a placeholder class that raises when called. The embedding side of
torchrec_tt does NOT work with it. Use only via ``PYTHONPATH=tools/torchrec_stub`` when
``import torchrec`` fails (bench/gpu_conv_session.sh does this).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _Meta(type):
    def __getattr__(cls, name: str):  # type: ignore[no-untyped-def]
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __call__(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("torchrec is not installed (tools/torchrec_stub placeholder)")


class Placeholder(metaclass=_Meta):
    pass


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name.startswith("__"):
        raise AttributeError(name)
    return Placeholder


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname.startswith("torchrec."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        mod = types.ModuleType(spec.name)
        mod.__path__ = []  # type: ignore[attr-defined]
        mod.__getattr__ = __getattr__  # type: ignore[attr-defined]
        return mod

    def exec_module(self, module) -> None:  # type: ignore[no-untyped-def]
        pass


sys.meta_path.insert(0, _StubFinder())
