"""examples/dlrm/train.py end to end on CPU/gloo: TT and uncompressed DLRM under DMP with a TT
plan and TrainPipelineSparseDist, checkpoint/resume, real-data path, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchrec_tt.criteo import CriteoFormatError, SyntheticCriteo

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "dlrm" / "train.py"
REAL_SAMPLE = ROOT.parent / "shared" / "data" / "criteo_kaggle_sample.tsv.gz"
# Small and fast: tables at 1/1000 of Kaggle, 8 steps of 128 rows per process.
SMALL = ["--scale", "0.001", "--batch-size", "128", "--eval-samples", "1024",
         "--eval-batch-size", "512", "--dense-arch", "16", "--over-arch", "16",
         "--tt-rank", "4", "--no-progress", "--threads", "1"]



def _run(out: Path, *extra: str, nproc: int = 2) -> str:
    cmd = [sys.executable, str(TRAIN), "--nproc", str(nproc), "--out", str(out), *SMALL, *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _history(out: Path, name: str) -> dict:
    with open(out / f"history_{name}.json") as f:
        return json.load(f)


def test_compare_run_then_kill_and_resume_gives_the_same_losses(tmp_path: Path) -> None:
    full = tmp_path / "full"
    stdout = _run(full, "--mode", "compare", "--steps", "8", "--eval-every", "4")
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("summary:") and "auc=" in last and "compression=" in last
    assert "auc_uncompressed=" in last
    summary = json.loads((full / "summary.json").read_text())
    by = {r["name"]: r for r in summary["results"]}
    assert by["tt"]["tt_tables"] == 7 and by["uncompressed"]["tt_tables"] == 0
    assert by["tt"]["embedding_bytes"] < by["uncompressed"]["embedding_bytes"]
    assert by["tt"]["compression"] == pytest.approx(
        by["uncompressed"]["embedding_bytes"] / by["tt"]["embedding_bytes"], rel=1e-6)
    for r in by.values():
        assert 0.5 < r["auc"] <= 1 and 0 < r["logloss"] < 1.5 and r["step_ms"] > 0
        assert r["peak_mib"] > 0
    # the 7 largest tables are TT in the planner's plan, under the TT sharder
    assert set(by["tt"]["plan"]) == {f"t_cat_{i}" for i in range(26)}
    assert (full / "curves.png").stat().st_size > 10_000
    assert any((full / "tb" / "tt").iterdir())

    # Stop after 5 steps (checkpointed), resume: same per-step losses and evaluations.
    part = tmp_path / "part"
    stopped = _run(part, "--mode", "compare", "--steps", "8", "--eval-every", "4",
                   "--stop-after", "5")
    assert "stopped after step 5" in stopped
    assert (part / "checkpoint" / "tt" / "latest").read_text().strip() == "step_5"
    resumed = _run(part, "--mode", "compare", "--steps", "8", "--eval-every", "4", "--resume")
    assert "[tt] resumed from step 5" in resumed
    for name in ("tt", "uncompressed"):
        a, b = _history(full, name), _history(part, name)
        assert len(a["loss"]) == len(b["loss"]) == 8
        assert a["loss"] == b["loss"], name  # bit-identical on CPU
        assert a["eval"] == b["eval"], name


def test_pipeline_matches_plain_training_and_pipelines_tt(tmp_path: Path) -> None:
    """TrainPipelineSparseDist (with an evaluation in the middle: detach/re-attach) gives the
    same losses as plain forward/backward."""
    piped = tmp_path / "piped"
    _run(piped, "--steps", "6", "--eval-every", "3")
    plain = tmp_path / "plain"
    _run(plain, "--steps", "6", "--eval-every", "3", "--no-pipeline")
    a, b = _history(piped, "tt"), _history(plain, "tt")
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    assert a["eval"][-1]["auc"] == pytest.approx(b["eval"][-1]["auc"], abs=1e-6)
    assert a["result"]["pipelined"] and not b["result"]["pipelined"]
    assert "ShardedTTEmbeddingBagCollection" in a["result"]["pipelined"]


def test_tsv_data_path(tmp_path: Path) -> None:
    data = tmp_path / "day.tsv.gz"
    SyntheticCriteo(scale=0.001, seed=5).write_tsv(str(data), rows=2000)
    stdout = _run(tmp_path / "out", "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
                  "--steps", "4", "--max-ind-range", "5000", "--test-fraction", "0.25",
                  nproc=1)
    assert "1500 train / 500 test rows" in stdout
    assert "auc=" in stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not REAL_SAMPLE.exists(),
                    reason=f"real Criteo sample not found at {REAL_SAMPLE} (shared/data)")
def test_real_sample_learns(tmp_path: Path) -> None:
    stdout = _run(tmp_path / "out", "--data", str(REAL_SAMPLE), "--cache-dir",
                  str(tmp_path / "cache"), "--steps", "60", "--batch-size", "256",
                  "--max-ind-range", "20000", "--eval-every", "60")
    auc = float(stdout.strip().splitlines()[-1].split("auc=")[1].split()[0])
    assert auc > 0.65  # well above chance on held-out real rows


def _import_train():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(TRAIN.parent))
    try:
        import train  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    return train


def test_missing_data_path_is_named(tmp_path: Path) -> None:
    train = _import_train()
    with pytest.raises(FileNotFoundError, match="nope.tsv' does not exist"):
        train.main(["--data", str(tmp_path / "nope.tsv")])


def test_malformed_tsv_names_file_and_line(tmp_path: Path) -> None:
    train = _import_train()
    bad = tmp_path / "bad.tsv"
    good = "0" + "\t1" * 13 + "\t68fd1e64" * 26
    bad.write_text("\n".join([good, good, good.replace("\t1\t", "\tabc\t", 1)]) + "\n")
    with pytest.raises(CriteoFormatError, match=r"bad\.tsv:3: I1 must be an integer"):
        train.main(["--data", str(bad), "--steps", "1", "--out", str(tmp_path / "o"),
                    "--cache-dir", str(tmp_path / "c"), "--no-progress"])


def test_policy_selecting_no_table_is_a_clear_error(tmp_path: Path) -> None:
    train = _import_train()
    with pytest.raises(ValueError, match="selects no table"):
        train.main(["--tt-min-rows", "10000000000", "--steps", "1", "--scale", "0.001",
                    "--out", str(tmp_path / "o"), "--no-progress"])


def test_torchx_component_runs_two_local_processes(tmp_path: Path) -> None:
    pytest.importorskip("torchx")
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    cmd = [os.path.join(venv_bin, "torchx"), "run", "-s", "local_cwd",
           "examples/dlrm/component.py:train", "--nproc_per_node", "2", "--python",
           sys.executable, "--", "--steps", "3", "--out", str(tmp_path / "out"), *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "2 process(es)" in out and "auc=" in out and "compression=" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2
