"""Smoke test of examples/cnn/train.py (WRN, dense vs TT, CIFAR-10) on the real data, tiny
settings. Skipped, with the reason, when the CIFAR-10 copy is not on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [os.environ.get("TORCHREC_TT_CIFAR10"), REPO.parent / "shared/data/cifar10",
              "/work/shared/data/cifar10", REPO / ".data/cifar10"]
DATA = next((Path(c) for c in CANDIDATES if c and (Path(c) / "train_0.npz").exists()), None)


@pytest.mark.skipif(DATA is None, reason="CIFAR-10 (shared/data/cifar10 or $TORCHREC_TT_CIFAR10) not found")
def test_cnn_example_smoke(tmp_path):
    cmd = [sys.executable, str(REPO / "examples/cnn/train.py"), "--data", str(DATA),
           "--depth", "10", "--width", "1", "--epochs", "1", "--limit-batches", "2",
           "--batch-size", "16", "--train-files", "0", "--test-limit", "256", "--tt", "3:8",
           "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| TT s3 r8 |" in out.stdout and "| dense |" in out.stdout
    (result,) = tmp_path.glob("*.json")
    runs = json.loads(result.read_text())["results"]
    assert [r["name"] for r in runs] == ["dense", "TT s3 r8"]
    assert runs[1]["params"]["total"] < runs[0]["params"]["total"]
    assert (tmp_path / (result.stem + ".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cnn_train", REPO / "examples/cnn/train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spectral_init_is_truncated_tt_svd_of_a_kaiming_weight():
    import torch

    ex = _load_example()
    from torchrec_tt import TTConv2d

    torch.manual_seed(0)
    full = TTConv2d(8, 12, 3, padding=1, bias=False, ranks=(8, 12))  # the largest ranks: exact
    ex.init_tt_spectral(full)
    w = full.full_weight()
    # Exact TT-SVD of a kaiming_normal(fan_out) draw: the variance is 2 / (K·3·3) up to sampling.
    assert abs(w.var().item() / (2.0 / (12 * 9)) - 1.0) < 0.25
    low = TTConv2d(8, 12, 3, padding=1, bias=False, ranks=(2, 2))
    ex.init_tt_spectral(low)
    # Truncation keeps the leading singular directions: less energy than the dense draw.
    assert 0 < low.full_weight().square().sum().item() < w.square().sum().item()


def test_frobenius_decay_sums_reconstructed_weights():
    import torch

    ex = _load_example()
    from torchrec_tt import TTConv2d

    layers = torch.nn.Sequential(TTConv2d(4, 6, 3, ranks=(2, 3)), torch.nn.ReLU(),
                                 TTConv2d(6, 5, (1, 2), ranks=(3, 3)))
    want = sum(m.full_weight().square().sum() for m in layers if isinstance(m, TTConv2d))
    got = ex.frobenius_decay(layers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()  # differentiable in the cores
    assert all(p.grad is not None for m in layers if isinstance(m, TTConv2d) for p in m.cores())


@pytest.mark.skipif(DATA is None, reason="CIFAR-10 (shared/data/cifar10 or $TORCHREC_TT_CIFAR10) not found")
def test_cnn_example_spectral_frobenius_smoke(tmp_path):
    cmd = [sys.executable, str(REPO / "examples/cnn/train.py"), "--data", str(DATA),
           "--depth", "10", "--width", "1", "--epochs", "1", "--limit-batches", "2",
           "--batch-size", "16", "--train-files", "0", "--test-limit", "128", "--tt", "3:8",
           "--models", "tt", "--tt-init", "spectral", "--tt-decay", "frobenius",
           "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| TT s3 r8 spectral frobenius |" in out.stdout


@pytest.mark.parametrize("conv_path, compile_backend", [("auto", "none"), ("fused", "eager")])
def test_cnn_example_reports_images_per_second_per_model(conv_path, compile_backend, capsys, tmp_path):
    """Synthetic images (no data needed): dense and TT throughput in one run, the TT path shown."""
    from torchrec_tt import conv_dispatch

    ex = _load_example()
    try:
        results = ex.main(["--synthetic", "64", "--test-limit", "32", "--depth", "10", "--width", "1",
                           "--epochs", "1", "--limit-batches", "3", "--warmup-steps", "1",
                           "--batch-size", "8", "--tt", "3:4", "--device", "cpu", "--no-progress",
                           "--conv_path", conv_path, "--compile", compile_backend,
                           "--out", str(tmp_path)])
    finally:
        conv_dispatch.settings.benchmark = None
        conv_dispatch.clear_plans()
    out = capsys.readouterr().out
    assert "| images/s | × dense | TT conv path |" in out
    dense, tt = results
    assert dense["timed_steps"] == tt["timed_steps"] == 2  # 3 steps, the first left out
    assert dense["images_per_s"] > 0 and tt["images_per_s"] > 0
    assert dense["conv_paths"] == {}
    # WRN-10-1 has two 3x3 layers in stage 3 (32->64 stride 2, 64->64); auto measured each.
    assert sum(tt["conv_paths"].values()) == 2
    if conv_path == "fused":
        assert tt["conv_paths"] == {"fused": 2}
    else:
        assert set(tt["conv_paths"]) <= {"fused", "composed"}
