"""Builds torchrec_tt and its extension module torchrec_tt._C.

The CPU kernels are always built. CUDA kernels (csrc/*.cu) are added when torch was built with
CUDA and nvcc is found, unless TORCHREC_TT_CUDA=0; TORCHREC_TT_CUDA=1 makes a missing toolkit an
error instead of a silent CPU-only build. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0".

torch must already be installed: build with ``pip wheel . --no-build-isolation`` (or
``pip install . --no-build-isolation``), so the extension is built against the torch that will
run it; under build isolation pip would fetch another torch (see pyproject.toml).
"""

from __future__ import annotations

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("TORCHREC_TT_CUDA", "auto").lower()
    has_cuda = (
        cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
    )
    if flag in ("0", "false", "off"):
        return False
    if flag in ("1", "true", "on") and not has_cuda:
        raise RuntimeError(
            "TORCHREC_TT_CUDA=1 but torch has no CUDA or nvcc was not found (CUDA_HOME)"
        )
    return has_cuda


def _extension() -> cpp_extension.BuildExtension:
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    if _want_cuda() and cu:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"torchrec_tt: building CPU + CUDA kernels ({len(cu)} .cu files)")
        return cpp_extension.CUDAExtension(
            "torchrec_tt._C",
            cpp + cu,
            extra_compile_args={
                "cxx": cxx + ["-DTORCHREC_TT_WITH_CUDA"],
                "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    print("torchrec_tt: building CPU kernels only")
    return cpp_extension.CppExtension(
        "torchrec_tt._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )


# The metadata (name, version from torchrec_tt/version.py, dependencies) and the packages are in
# pyproject.toml; this file adds what it cannot express: the extension.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
