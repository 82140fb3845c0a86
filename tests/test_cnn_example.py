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
