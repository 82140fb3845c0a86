"""Smoke runs of examples/gnn/train.py (featureless node classification, TT vs full table) and
of its data readers: the synthetic power-law graph always, Cora when shared/data/graphs is on
this machine (skipped with the reason otherwise). A few epochs: seconds. The training runs are
subprocesses: importing torch_geometric (the example's model) registers overloads that break
TorchScript compilation of other modules later in the same process (tests/test_inference.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):  # noqa: ANN202
    sys.path.insert(0, str(REPO / "examples" / "gnn"))
    spec = importlib.util.spec_from_file_location(f"gnn_{name}", REPO / "examples" / "gnn" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


train = _load("train")
data = _load("data")
GRAPHS = data.find_graph_root()


def _run(argv: list[str], tmp_path: Path) -> tuple[dict[str, str], dict]:
    """examples/gnn/train.py in a subprocess: its summary line and its JSON result."""
    out = tmp_path / "result.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "gnn" / "train.py"), *argv, "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    summary = dict(kv.split("=", 1) for kv in last.split() if "=" in kv)
    return summary, json.loads(out.read_text().splitlines()[-1])


@pytest.mark.parametrize("embedding", ["tt", "full"])
def test_synthetic_smoke(embedding, tmp_path):
    extra = ["--reorder", "--fused"] if embedding == "tt" else ["--full_optimizer", "sparse_adam"]
    s, res = _run(["--dataset", "synthetic", "--num_nodes", "3000", "--embedding", embedding,
                   "--epochs", "2", "--steps_per_epoch", "2", "--batch_size", "64",
                   "--embedding_dim", "16", "--hidden", "16", "--tt_rank", "4", "--threads", "1", *extra], tmp_path)
    assert 0.0 <= float(s["acc"]) <= 1.0 and s["compression"].endswith("x")
    assert len(res["epoch_time_s"]) == 2 and res["peak_memory_bytes"] > 0
    if embedding == "tt":
        assert res["compression"] > res["compression_with_map"] > 1.0
    else:
        assert res["compression"] == 1.0


@pytest.mark.skipif(GRAPHS is None, reason="shared/data/graphs (Planetoid files) not found")
def test_cora_smoke_learns(tmp_path):
    s, res = _run(["--dataset", "cora", "--embedding", "tt", "--epochs", "30", "--reorder",
                   "--init", "spectral", "--threads", "1"], tmp_path)
    assert res["num_nodes"] == 2708 and float(s["compression"][:-1]) >= 100
    assert res["test_acc"] > 0.3  # 7 classes, the largest 31.9% of the test nodes: above chance


@pytest.mark.skipif(GRAPHS is None, reason="shared/data/graphs (Planetoid files) not found")
def test_planetoid_reader_matches_the_release():
    for name, nodes, edges, classes in [("cora", 2708, 10556, 7), ("citeseer", 3327, 9104, 6),
                                        ("pubmed", 19717, 88648, 3)]:
        g = data.load_planetoid(GRAPHS, name)
        assert (g.num_nodes, g.edge_index.shape[1], g.num_classes) == (nodes, edges, classes)
        assert (len(g.val), len(g.test)) == (500, 1000)
        assert len(set(g.train.tolist()) | set(g.val.tolist()) | set(g.test.tolist())) == len(g.train) + 1500


def test_power_law_graph_has_heavy_tail_and_homophily():
    g = data.power_law_graph(20000, 10.0, num_classes=8, seed=1)
    deg = torch.bincount(g.edge_index[0], minlength=g.num_nodes)
    assert 8.0 < deg.float().mean() < 10.5 and deg.max() > 50 * deg.float().median()
    same = (g.labels[g.edge_index[0]] == g.labels[g.edge_index[1]]).float().mean()
    assert 0.75 < same < 0.9  # homophily 0.8 plus the 1/8 chance of a random target's class
    with pytest.raises(ValueError, match="exponent"):
        data.power_law_graph(1000, exponent=2.0)


def test_neighbour_sampler_returns_real_edges():
    g = data.power_law_graph(2000, 6.0, seed=2)
    from torchrec_tt.graph import to_csr

    rowptr, col = to_csr(g.edge_index, g.num_nodes)
    seeds = torch.arange(0, 2000, 37)
    nodes, ei, pos = train.sample_subgraph(rowptr, col, seeds, [4, 3], torch.Generator().manual_seed(0))
    assert torch.equal(nodes[pos], seeds)
    edges = set(map(tuple, g.edge_index.T.tolist()))
    assert all((int(nodes[s]), int(nodes[d])) in edges for s, d in ei.T.tolist())


def test_cli_rejects_bad_flags():
    with pytest.raises(SystemExit):
        train.parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        train.parse_args(["--embedding", "full", "--reorder"])
