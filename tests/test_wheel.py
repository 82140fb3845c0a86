"""`pip wheel .` on a clean copy of the checkout (the tracked files only): the wheel builds
without build isolation, CPU-only, installs into an empty directory and imports from there with
its metadata, type marker and a working operator.

Opt-in (``TORCHREC_TT_WHEEL_TEST=1``): the build compiles the C++ extension, 158 s of CPU time
(about 80 s on 2 idle cores; 8 min at load 7.8 on the project's 2-core machine, 2026-12-03),
more than the suite's budget for one test."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import torchrec_tt

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    os.environ.get("TORCHREC_TT_WHEEL_TEST") != "1",
    reason="builds the wheel (compiles the extension, ~80 s on 2 cores): set TORCHREC_TT_WHEEL_TEST=1",
)


def _clean_checkout(dest: Path) -> None:
    """The tracked files of the working tree (as a fresh clone has them) copied to ``dest``."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the wheel is built from the tracked files)")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_wheel_builds_installs_and_imports(tmp_path: Path) -> None:
    src, dist, site = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
    src.mkdir()
    _clean_checkout(src)
    env = {**os.environ, "TORCHREC_TT_CUDA": "0", "MAX_JOBS": str(os.cpu_count() or 2)}
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-build-isolation",
                    "--no-deps", "-w", str(dist), "-q"], check=True, env=env)
    wheels = list(dist.glob("torchrec_tt-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    assert wheel.name.startswith(f"torchrec_tt-{torchrec_tt.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "torchrec_tt/py.typed" in names
    assert any(n.startswith("torchrec_tt/sharding/") for n in names)
    assert any(n.startswith("torchrec_tt/_C") and n.endswith(".so") for n in names)
    assert "License-Expression: BSD-3-Clause" in metadata or "License: BSD-3-Clause" in metadata
    assert "Requires-Dist: torchrec" in metadata

    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True)
    probe = (
        "import torch, torchrec_tt, torchrec_tt.sharding, torchrec_tt.inference\n"
        "from torchrec.sparse.jagged_tensor import KeyedJaggedTensor\n"
        "print(torchrec_tt.__file__)\n"
        "print(torchrec_tt.__version__)\n"
        "cfg = torchrec_tt.TTEmbeddingBagConfig(name='t', num_embeddings=100, embedding_dim=4,"
        " feature_names=['f'], tt_ranks=[2])\n"
        "ebc = torchrec_tt.TTEmbeddingBagCollection([cfg])\n"
        "kjt = KeyedJaggedTensor.from_lengths_sync(['f'], torch.tensor([1, 99]), torch.tensor([1, 1]))\n"
        "out = ebc(kjt)['f']\n"
        "ref = ebc.full_weight('t')[torch.tensor([1, 99])]\n"
        "print(bool(torch.allclose(out, ref, atol=1e-6)))\n"
    )
    # Run outside the checkout, with the installed copy first on the path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert Path(out[0]).resolve().is_relative_to(site.resolve()), out
    assert out[1:] == [torchrec_tt.__version__, "True"]
