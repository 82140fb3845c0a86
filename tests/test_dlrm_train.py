"""examples/dlrm/train.py end to end on CPU/gloo: TT and uncompressed DLRM under DMP with a TT
plan and TrainPipelineSparseDist, checkpoint/resume, real-data path, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_tt.criteo import CriteoFormatError, SyntheticCriteo

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "dlrm" / "train.py"
REAL_SAMPLE = ROOT.parent / "shared" / "data" / "criteo_kaggle_sample.tsv.gz"
# Small and fast: tables at 1/1000 of Kaggle, 8 steps of 128 rows per process.
SMALL = ["--scale", "0.001", "--batch-size", "128", "--eval-samples", "1024",
         "--eval-batch-size", "512", "--dense-arch", "16", "--over-arch", "16",
         "--tt-rank", "4", "--no-progress", "--threads", "1"]



def _env() -> dict[str, str]:
    """This checkout's torchrec_tt first (an editable install may point at another one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(out: Path, *extra: str, nproc: int = 2, stderr: bool = False) -> str:
    cmd = [sys.executable, str(TRAIN), "--nproc", str(nproc), "--out", str(out), *SMALL, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr if stderr else proc.stdout


def _history(out: Path, name: str) -> dict:
    with open(out / f"history_{name}.json") as f:
        return json.load(f)


def test_compare_run_then_kill_and_resume_gives_the_same_losses(tmp_path: Path) -> None:
    full = tmp_path / "full"
    output = _run(full, "--mode", "compare", "--steps", "8", "--eval-every", "4", stderr=True)
    assert "Sharding spec not found" not in output  # TorchRec's false warning per DP table
    last = [ln for ln in output.splitlines() if ln.startswith("summary:")][-1]
    assert "auc=" in last and "compression=" in last and "ne=" in last
    assert "auc_uncompressed=" in last
    summary = json.loads((full / "summary.json").read_text())
    by = {r["name"]: r for r in summary["results"]}
    assert by["tt"]["tt_tables"] == 7 and by["uncompressed"]["tt_tables"] == 0
    assert by["tt"]["embedding_bytes"] < by["uncompressed"]["embedding_bytes"]
    assert by["tt"]["compression"] == pytest.approx(
        by["uncompressed"]["embedding_bytes"] / by["tt"]["embedding_bytes"], rel=1e-6)
    for r in by.values():
        assert 0.5 < r["auc"] <= 1 and 0 < r["logloss"] < 1.5 and r["step_ms"] > 0
        assert 0 < r["ne"] < 1.5 and r["calibration"] > 0 and r["peak_mib"] > 0
        # samples/s is the step time of the same windows: 2 processes x 128 rows per step
        assert r["samples_per_s"] == pytest.approx(2 * 128 * 1e3 / r["step_ms"], rel=1e-6)
    assert summary["environment"]["torchrec"] and summary["environment"]["device"]
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


def test_npy_folder_with_bad_labels_fails_before_training(tmp_path: Path) -> None:
    # Issue 13 item 6: labels of 5 used to train to completion (auc 0, logloss -184.9, exit 0).
    train = _import_train()
    folder = tmp_path / "npys"
    folder.mkdir()
    n = 64
    np.save(folder / "dense.npy", np.zeros((n, 13), dtype=np.float32))
    np.save(folder / "sparse.npy", np.zeros((n, 26), dtype=np.int64))
    np.save(folder / "labels.npy", np.full((n, 1), 5, dtype=np.int32))
    with pytest.raises(CriteoFormatError, match=r"labels\.npy: row 0: label must be 0 or 1, got 5"):
        train.main(["--data", str(folder), "--steps", "1", "--out", str(tmp_path / "o"),
                    "--no-progress", *SMALL])
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.pt"))


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
    env["PYTHONPATH"] = _env()["PYTHONPATH"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "2 process(es)" in out and "auc=" in out and "compression=" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2


# ------------------------------------------------------------------------------ flags

KAGGLE_26 = ",".join(str(n) for n in range(100, 126))


def test_torchrec_flag_names_and_meanings() -> None:
    train = _import_train()
    a = train.parse_args(["--batch_size", "512", "--epochs", "2", "--limit_train_batches", "30",
                          "--num_embeddings_per_feature", KAGGLE_26, "--embedding_dim", "8",
                          "--dense_arch_layer_sizes", "64,8", "--over_arch_layer_sizes", "32,1",
                          "--adagrad", "--learning_rate", "0.1", "--multi_hot_sizes",
                          ",".join(["2"] * 26), "--test_batch_size", "256"])
    assert a.batch_size == 512 and a.learning_rate == 0.1 and a.optimizer == "adagrad"
    assert a.dense_arch_layer_sizes == [64, 8] and a.over_arch_layer_sizes == [32, 1]
    assert train.cardinalities(a) == list(range(100, 126)) and a.multi_hot_sizes == [2] * 26
    assert train.resolve_steps(a, None) == 60  # epochs x limit_train_batches
    assert train.resolve_steps(a, 20) == 40  # an epoch of real data is at most one pass
    # older spellings: same flags; --dense-arch/--over-arch keep their hidden-layers meaning
    old = train.parse_args(["--batch-size", "512", "--embedding-dim", "8", "--dense-arch", "64",
                            "--over-arch", "32", "--lr", "0.1", "--eval-batch-size", "256"])
    assert (old.batch_size, old.learning_rate, old.test_batch_size) == (512, 0.1, 256)
    assert old.dense_arch_layer_sizes == [64, 8] and old.over_arch_layer_sizes == [32, 1]
    assert train.parse_args(["--sgd"]).optimizer == "sgd"
    assert train.parse_args([]).dense_arch_layer_sizes == [128, 64, 16]


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    train = _import_train()
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--embedding_dim EMBEDDING_DIM, --embedding-dim EMBEDDING_DIM",
                     "embedding dimension of every table (default: 16)",
                     "TT rank (all inner ranks) (default: 32)", "(default: 50)"):
        assert fragment in text


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--nproc", "-3"], "--nproc must be >= 1, got -3"),
    (["--nproc", "1000"], "--nproc 1000 exceeds the"),
    (["--eval-batch-size", "0"], "--test_batch_size must be >= 1, got 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--dense-arch", "abc"], "argument --dense-arch: 'abc' is not a comma-separated list"),
    (["--dense_arch_layer_sizes", "64,x"], "argument --dense_arch_layer_sizes"),
    (["--dense_arch_layer_sizes", "64,32"], "must end in the embedding dim 16 (--embedding_dim)"),
    (["--over_arch_layer_sizes", "64,2"], "--over_arch_layer_sizes [64, 2] must end in 1"),
    (["--num_embeddings_per_feature", "10,20"], "--num_embeddings_per_feature needs 26 values"),
    (["--multi_hot_sizes", ",".join(["1"] * 25 + ["0"])], "argument --multi_hot_sizes"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--dense-arch", "64", "--dense_arch_layer_sizes", "64,16"], "not both"),
    (["--multi_hot_sizes", ",".join(["2"] * 26), "--data", "x.tsv"], "synthetic only"),
    (["--tt-cache-fraction", "1.5"], "--tt_cache_fraction must be in [0, 1], got 1.5"),
    (["--tt_cache_refresh_steps", "0"], "--tt_cache_refresh_steps must be >= 1, got 0"),
    (["--tt_cache_fraction", "0.1", "--mlet_inner_dim", "32"], "does not combine with --mlet"),
])
def test_bad_flags_are_named_before_anything_runs(argv: list[str], message: str,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE"):  # not under torchrun: --nproc is ours to bound
        monkeypatch.delenv(var, raising=False)
    train = _import_train()
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_tt_cache_flags_set_the_tt_tables_caches() -> None:
    """--tt_cache_fraction / --tt_cache_refresh_steps reach the TT tables' configs (the sharded
    cache itself: tests/distributed/test_hot_cache_gloo.py)."""
    from torchrec_tt import TTEmbeddingBagConfig

    train = _import_train()
    args = train.parse_args([*SMALL, "--nproc", "1", "--tt-cache-fraction", "0.05",
                             "--tt-cache-refresh-steps", "7"])
    cards = [1000 * (i + 1) for i in range(26)]
    configs = train.table_configs(args, cards, True)
    tt = [c for c in configs if isinstance(c, TTEmbeddingBagConfig)]
    assert len(tt) == 7
    assert all(c.tt_cache_rows == int(0.05 * c.num_embeddings) > 0 for c in tt)
    assert all(c.tt_cache_refresh_steps == 7 for c in tt)
    default = train.table_configs(train.parse_args([*SMALL, "--nproc", "1"]), cards, True)
    assert all(c.tt_cache_rows == 0 for c in default if isinstance(c, TTEmbeddingBagConfig))


def test_resume_without_checkpoint_says_so(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    train = _import_train()
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--resume: no checkpoint under" in err and str(tmp_path) in err
    a = train.parse_args(["--resume_if_present", "--out", str(tmp_path)])
    assert a.resume  # loads one if present, else starts from step 0


# ------------------------------------------------------------------------------ metrics


def test_eval_metrics_match_a_direct_computation() -> None:
    """torchrec.metrics NE, AUC, calibration and log-loss against numpy formulas."""
    import numpy as np
    import torch

    train = _import_train()
    gen = torch.Generator().manual_seed(0)
    metrics = train.EvalMetrics(1, 0, 500, torch.device("cpu"))
    all_logits, all_labels = [], []
    for _ in range(3):
        logits = torch.randn(500, generator=gen) * 2
        labels = (torch.rand(500, generator=gen) < torch.sigmoid(logits + 0.5)).float()
        metrics.update(logits, labels)
        all_logits.append(logits)
        all_labels.append(labels)
    got = metrics.compute()
    z = torch.cat(all_logits).double().numpy()
    y = torch.cat(all_labels).double().numpy()
    p = 1 / (1 + np.exp(-z))
    logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    rate = y.mean()
    entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    ranks = np.argsort(np.argsort(p)) + 1  # Mann-Whitney U (no ties in continuous scores)
    pos = y == 1
    auc = (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
    assert got["logloss"] == pytest.approx(logloss, rel=1e-5)
    assert got["ne"] == pytest.approx(logloss / entropy, rel=1e-5)
    assert got["auc"] == pytest.approx(auc, abs=1e-5)
    assert got["calibration"] == pytest.approx(p.sum() / y.sum(), rel=1e-5)


# ------------------------------------------------------------------------------ multi-hot


def test_multi_hot_trains_through_tt_sharding_and_evaluation(tmp_path: Path) -> None:
    sizes = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 4, 4, 2, 1, 3, 1, 1]
    out = tmp_path / "mh"
    stdout = _run(out, "--steps", "6", "--eval-every", "3", "--multi_hot_sizes",
                  ",".join(map(str, sizes)), "--multi_hot_distribution_type", "uniform")
    assert f"multi-hot {sum(sizes)} ids/sample (uniform)" in stdout
    h = _history(out, "tt")
    assert len(h["loss"]) == 6 and len(h["eval"]) == 2
    assert 0.5 < h["eval"][-1]["auc"] <= 1
    assert "ShardedTTEmbeddingBagCollection" in h["result"]["pipelined"]


def test_flat_interaction_matches_torchrec() -> None:
    """The trainer's interaction (index_select on the flattened matrix) gives TorchRec's
    InteractionArch output and input gradients exactly, and keeps its (empty) state_dict."""
    _import_train()  # puts examples/dlrm's modules in sys.modules
    from dlrm_interaction import FlatInteractionArch  # type: ignore[import-not-found]
    from torchrec.models.dlrm import InteractionArch

    torch.manual_seed(0)
    for features in (1, 5, 26):
        dense = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
        sparse = torch.randn(7, features, 8, dtype=torch.float64, requires_grad=True)
        ref, flat = InteractionArch(features), FlatInteractionArch(features)
        want, got = ref(dense, sparse), flat(dense, sparse)
        assert torch.equal(want, got)
        up = torch.randn_like(want)
        grads_want = torch.autograd.grad(want, (dense, sparse), up)
        grads_got = torch.autograd.grad(got, (dense, sparse), up)
        for a, b in zip(grads_want, grads_got):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert flat.state_dict().keys() == ref.state_dict().keys()


# ------------------------------------------------------------------------------ non-finite skip


def _nan_steps(rank: int, world_size: int) -> list[dict]:
    return [_nan_step(rank, world_size, extra) for extra in ([], ["--no_skip_non_finite"])]


def _nan_step(rank: int, world_size: int, extra: list[str]) -> dict:
    """One training step of the trainer's TT model on a batch with a NaN dense feature."""
    import torch
    import torch.distributed as dist

    from torchrec_tt.sharding import tt_skipped_steps

    train = _import_train()
    args = train.parse_args([*SMALL, "--nproc", "1", "--steps", "1", *extra])
    cpu = torch.device("cpu")
    data = train.load_data(args, rank, cpu)
    dmp, _, _ = train.build(args, data, True, cpu, dist.group.WORLD)
    cores = {n: p for n, p in dmp.named_parameters() if ".embedding_bag_collection.tt." in n}
    before = {n: p.detach().clone() for n, p in cores.items()}
    batch = next(data.train_batches(args, rank, world_size, 0))
    batch.dense_features[0, 0] = float("nan")
    loss, _ = dmp(batch)
    loss.backward()
    return {"loss_finite": bool(torch.isfinite(loss)), "skipped": tt_skipped_steps(dmp.fused_optimizer),
            "unchanged": all(torch.equal(p, before[n]) for n, p in cores.items()),
            "cores_finite": all(bool(torch.isfinite(p).all()) for p in cores.values()),
            "tables": len(cores)}


def test_non_finite_tt_updates_are_skipped_and_counted_by_default() -> None:
    from torchrec_tt.sharding.testing import run_multiprocess

    ((on, off),) = run_multiprocess(_nan_steps, 1)
    assert not on["loss_finite"] and on["tables"] > 0
    assert on["unchanged"] and on["cores_finite"]
    assert len(on["skipped"]) == 7 and set(on["skipped"].values()) == {1}  # the 7 TT tables
    assert not off["cores_finite"]  # the failure: NaN written into the cores
    assert set(off["skipped"].values()) == {0}


# ------------------------------------------------------------------------------ binary days


def _convert(tmp_path: Path, rows: int, *flags: str) -> Path:
    """A synthetic TSV of ``rows`` rows through ``python -m torchrec_tt.criteo --in-memory-binary``
    (the tool users run) into ``tmp_path/bin``."""
    tsv = tmp_path / "rows.tsv.gz"
    SyntheticCriteo(scale=0.001, seed=5).write_tsv(str(tsv), rows=rows)
    conv = subprocess.run([sys.executable, "-m", "torchrec_tt.criteo", str(tsv), "--cache-dir",
                           str(tmp_path / "cache"), "--in-memory-binary", str(tmp_path / "bin"),
                           *flags], capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert conv.returncode == 0, conv.stderr[-3000:]
    assert conv.stdout.strip() == str(tmp_path / "bin")
    return tmp_path / "bin"


def _trains_and_resumes_exactly(tmp_path: Path, *flags: str) -> str:
    """3 steps in one go, and stopped after 1 then resumed: the same losses and evaluations.
    Returns the first run's output."""
    full = _run(tmp_path / "full", *flags, "--steps", "3", "--eval-every", "3", nproc=1)
    assert "auc=" in full.strip().splitlines()[-1]
    _run(tmp_path / "part", *flags, "--steps", "3", "--eval-every", "3", "--stop-after", "1",
         nproc=1)
    resumed = _run(tmp_path / "part", *flags, "--steps", "3", "--eval-every", "3", "--resume",
                   nproc=1)
    assert "[tt] resumed from step 1" in resumed
    a, b = _history(tmp_path / "full", "tt"), _history(tmp_path / "part", "tt")
    assert len(a["loss"]) == 3 and a["loss"] == b["loss"] and a["eval"] == b["eval"]
    return full


def test_in_memory_binary_criteo_path_trains_and_resumes_exactly(tmp_path: Path) -> None:
    """TSV -> TorchRec's day_<i>_*.npy (python -m torchrec_tt.criteo --in-memory-binary) ->
    InMemoryBinaryCriteoIterDataPipe in a DataLoader: trains, and a stopped run resumed gives
    the same losses (the shuffled batches included)."""
    folder = _convert(tmp_path, 1200, "--days", "3")
    full = _trains_and_resumes_exactly(
        tmp_path, "--in_memory_binary_criteo_path", str(folder), "--max-ind-range", "5000",
        "--shuffle_batches", "--pin_memory", "--mmap_mode")
    assert "3 days (TorchRec's InMemoryBinaryCriteoIterDataPipe, mmap, shuffled batches)" in full
    assert "validation 200 / test 200 rows of day 2" in full


def test_drop_last_training_batch_is_dlrm_mains(tmp_path: Path) -> None:
    """Without --drop_last_training_batch an epoch trains on the last, smaller batch too (as
    TorchRec's dlrm_main.py); with it, only on full batches."""
    from torchrec_tt.criteo import tsv_to_binary_criteo

    tsv = tmp_path / "rows.tsv.gz"
    SyntheticCriteo(scale=0.001, seed=5).write_tsv(str(tsv), rows=600)
    tsv_to_binary_criteo(str(tsv), str(tmp_path / "bin"), 3, str(tmp_path / "cache"))
    # 2 train days of 200 rows, batches of 128: 3 full ones and one of 16
    flags = ["--in_memory_binary_criteo_path", str(tmp_path / "bin"), "--max-ind-range", "5000",
             "--epochs", "1", "--eval-every", "100"]
    _run(tmp_path / "keep", *flags, nproc=1)
    _run(tmp_path / "drop", *flags, "--drop_last_training_batch", nproc=1)
    keep, drop = _history(tmp_path / "keep", "tt"), _history(tmp_path / "drop", "tt")
    assert len(keep["loss"]) == 4 and len(drop["loss"]) == 3
    assert keep["loss"][:3] == drop["loss"]  # the same full batches first
    with pytest.raises(SystemExit):
        _import_train().parse_args(["--drop_last_training_batch"])


def test_in_memory_binary_bad_day_is_named_before_training(tmp_path: Path) -> None:
    from torchrec_tt.criteo import tsv_to_binary_criteo

    tsv = tmp_path / "rows.tsv.gz"
    SyntheticCriteo(scale=0.001, seed=5).write_tsv(str(tsv), rows=300)
    days = tsv_to_binary_criteo(str(tsv), str(tmp_path / "bin"), 2, str(tmp_path / "cache"))
    labels = np.load(days[1]["labels"])
    labels[7] = 5
    np.save(days[1]["labels"], labels)
    cmd = [sys.executable, str(TRAIN), "--nproc", "1", "--out", str(tmp_path / "out"), *SMALL,
           "--in_memory_binary_criteo_path", str(tmp_path / "bin"), "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode != 0
    assert "day_1_labels.npy: row 7: label must be 0 or 1, got 5" in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_criteo_kaggle_layout_trains_and_resumes_exactly(tmp_path: Path) -> None:
    """TSV -> TorchRec's criteo_kaggle layout (python -m torchrec_tt.criteo --in-memory-binary
    --dataset-name criteo_kaggle) -> --dataset_name criteo_kaggle: trains on the whole train
    file, evaluates on its second half (dlrm_main.py's split), and a stopped run resumed gives
    the same losses (the shuffled batches included)."""
    folder = _convert(tmp_path, 801, "--dataset-name", "criteo_kaggle")
    assert sorted(os.listdir(folder)) == ["train_dense.npy", "train_labels.npy",
                                          "train_sparse.npy"]
    full = _trains_and_resumes_exactly(
        tmp_path, "--in_memory_binary_criteo_path", str(folder), "--dataset_name",
        "criteo_kaggle", "--max-ind-range", "5000", "--shuffle_batches", "--mmap_mode")
    assert ("criteo_kaggle train file (TorchRec's InMemoryBinaryCriteoIterDataPipe, mmap, "
            "shuffled batches): all 801 rows trained on, 7 batches/rank; validation = test = its "
            "last 400 rows") in full


def _kaggle_folder(folder: Path, rows: int = 40) -> dict[str, Path]:
    """A small valid train_{dense,sparse,labels}.npy triple, TorchRec's dtypes and shapes."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    arrays = {"dense": np.log(rng.integers(2, 50, (rows, 13))).astype(np.float32),
              "sparse": rng.integers(0, 2**31, (rows, 26)).astype(np.int64),
              "labels": rng.integers(0, 2, (rows, 1)).astype(np.int32)}
    paths = {k: folder / f"train_{k}.npy" for k in arrays}
    for k, a in arrays.items():
        np.save(paths[k], a)
    return paths


def _corrupt(paths: dict[str, Path], kind: str, edit) -> None:  # type: ignore[no-untyped-def]
    np.save(paths[kind], edit(np.load(paths[kind])))


def _set(row: int, col: int, value: float):  # type: ignore[no-untyped-def]
    def edit(a: np.ndarray) -> np.ndarray:
        a[row, col] = value
        return a
    return edit


@pytest.mark.parametrize("kind, edit, message", [
    ("labels", _set(7, 0, 5), "train_labels.npy: row 7: label must be 0 or 1, got 5"),
    ("dense", _set(11, 2, np.inf), "train_dense.npy: row 11, column 2 (I3): dense value inf is "
                                   "not finite"),
    ("sparse", _set(3, 25, -4), "train_sparse.npy: row 3, column 25 (C26): negative id -4"),
    ("sparse", lambda a: a[:, :25], r"train_sparse.npy: expected shape (rows, 26) (C1..C26), "
                                    r"got (40, 25)"),
    ("labels", lambda a: a[:39], "row counts of the Criteo files disagree"),
    ("dense", lambda a: a.astype(np.int32), "expected floating dense features"),
])
def test_criteo_kaggle_bad_files_are_named(tmp_path: Path, kind: str, edit,  # type: ignore[no-untyped-def]
                                           message: str) -> None:
    """The trainer's check of the layout (the same checks as the day files), before the pipes
    or the model exist: the file, the first bad row and value."""
    train = _import_train()
    paths = _kaggle_folder(tmp_path / "bin")
    args = train.parse_args(["--in_memory_binary_criteo_path", str(tmp_path / "bin"),
                             "--dataset_name", "criteo_kaggle", "--max-ind-range", "5000"])
    data = train.load_binary(args, train.cardinalities(args), 0, 1)
    assert len(data.binary["train"]) == 1 and data.binary["test"] is data.binary["val"]
    _corrupt(paths, kind, edit)
    with pytest.raises(CriteoFormatError) as e:
        train.load_binary(args, train.cardinalities(args), 0, 1)
    assert message in str(e.value)


def test_criteo_kaggle_one_row_has_no_evaluation_half(tmp_path: Path) -> None:
    train = _import_train()
    _kaggle_folder(tmp_path / "bin", rows=1)
    args = train.parse_args(["--in_memory_binary_criteo_path", str(tmp_path / "bin"),
                             "--dataset_name", "criteo_kaggle"])
    with pytest.raises(CriteoFormatError, match="train_labels.npy: 1 row; validation and test"):
        train.load_binary(args, train.cardinalities(args), 0, 1)


def test_dataset_name_flag_is_dlrm_mains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = _import_train()
    assert train.parse_args([]).dataset_name == "criteo_1t"  # dlrm_main.py's default
    _kaggle_folder(tmp_path / "bin")
    cases = [
        (["--dataset_name", "criteo_kaggle"], "apply to --in_memory_binary_criteo_path"),
        (["--dataset_name", "criteo_1tb"], "invalid choice: 'criteo_1tb'"),
        (["--in_memory_binary_criteo_path", str(tmp_path / "bin")],
         "the Criteo Kaggle layout: --dataset_name criteo_kaggle"),
        (["--in_memory_binary_criteo_path", str(tmp_path), "--dataset_name", "criteo_kaggle"],
         "train_{dense,sparse,labels}.npy; missing"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert message in capsys.readouterr().err, argv


def test_criteo_kaggle_bad_file_stops_before_training(tmp_path: Path) -> None:
    paths = _kaggle_folder(tmp_path / "bin", rows=300)
    _corrupt(paths, "labels", _set(7, 0, 5))
    cmd = [sys.executable, str(TRAIN), "--nproc", "1", "--out", str(tmp_path / "out"), *SMALL,
           "--in_memory_binary_criteo_path", str(tmp_path / "bin"), "--dataset_name",
           "criteo_kaggle", "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode != 0
    assert "train_labels.npy: row 7: label must be 0 or 1, got 5" in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


# ------------------------------------------------------------------------------ LR policy


def test_lr_factor_is_dlrm_mains_policy(capsys: pytest.CaptureFixture[str]) -> None:
    train = _import_train()
    f = train.lr_factor
    assert [f(s, 4, 0, 0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # warm-up 2, flat, decay from step 4 over 4 steps (power 2), then held
    got = [f(s, 2, 4, 4) for s in range(10)]
    assert got == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5625, 0.25, 0.0625, 0.0625, 0.0625]
    with pytest.raises(SystemExit):
        train.parse_args(["--lr_warmup_steps", "-1"])
    assert "--lr_warmup_steps must be >= 0, got -1" in capsys.readouterr().err


def test_lr_schedule_changes_training_and_resumes_exactly(tmp_path: Path) -> None:
    base = ["--mode", "tt", "--steps", "4", "--eval-every", "4"]
    sched = [*base, "--lr_warmup_steps", "2", "--lr_decay_start", "2", "--lr_decay_steps", "2"]
    _run(tmp_path / "plain", *base, nproc=1)
    _run(tmp_path / "full", *sched, nproc=1)
    plain, full = _history(tmp_path / "plain", "tt"), _history(tmp_path / "full", "tt")
    assert plain["loss"][0] == full["loss"][0]  # the first step's forward precedes any update
    assert plain["loss"][1:] != full["loss"][1:]  # halved, then decayed, rates
    _run(tmp_path / "part", *sched, "--stop-after", "3", nproc=1)
    _run(tmp_path / "part", *sched, "--resume", nproc=1)
    part = _history(tmp_path / "part", "tt")
    assert part["loss"] == full["loss"] and part["eval"] == full["eval"]
