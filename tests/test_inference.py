"""The inference path: TorchScript (direct and after torchrec.fx), torch.export, and quantized
serving of TT tables (torchrec_tt.inference), against the float eager model."""

import copy
import io
import warnings
from pathlib import Path

import pytest
import torch
import torchrec.fx
import torchrec.inference.modules as trec_inference
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.inference import (
    QuantTTEmbeddingBagCollection,
    _Int8Cores,
    dense_quantized_bytes,
    kjt_dynamic_shapes,
    quantize_embeddings,
)
from torchrec_tt.swap import HybridEmbeddingBagCollection

ROOT = Path(__file__).resolve().parent.parent
D = 8


def _tables() -> list[EmbeddingBagConfig]:
    return [
        TTEmbeddingBagConfig(name="t_small", num_embeddings=300, embedding_dim=D,
                             feature_names=["a"], tt_ranks=[4]),
        TTEmbeddingBagConfig(name="t_big", num_embeddings=200_000, embedding_dim=D,
                             feature_names=["b", "c"], tt_ranks=[8, 8]),
        EmbeddingBagConfig(name="p1", num_embeddings=50, embedding_dim=D, feature_names=["d"]),
        EmbeddingBagConfig(name="p2", num_embeddings=70, embedding_dim=D, feature_names=["e"]),
    ]


def _kjt(keys: list[str], batch: int, seed: int, weighted: bool = False) -> KeyedJaggedTensor:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=gen)
    values = torch.randint(0, 50, (int(lengths.sum()),), generator=gen)
    weights = torch.rand(values.shape, generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)


def _dlrm(seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    return DLRM(embedding_bag_collection=HybridEmbeddingBagCollection(_tables()),
                dense_in_features=3, dense_arch_layer_sizes=[8, D], over_arch_layer_sizes=[8, 1])


def _inputs(seed: int) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    # Extra key "zz" (ignored) and a key order unlike the tables'.
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(seed)), _kjt(
        ["e", "zz", "c", "a", "d", "b"], 4, seed)


def _save_load(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


def _export(model: torch.nn.Module, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.nn.Module:
    """Exported with dynamic sizes, saved and loaded back."""
    shapes = ({0: torch.export.Dim.AUTO}, kjt_dynamic_shapes(kjt))
    program = torch.export.export(model, (dense, kjt), dynamic_shapes=shapes, strict=False)
    program.example_inputs = None  # a KJT, which torch.export.load's weights_only load refuses
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    return torch.export.load(buf).module()


# ------------------------------------------------------------------ TorchScript and export


def test_script_tt_collection_directly_and_after_fx() -> None:
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection([t for t in _tables() if isinstance(t, TTEmbeddingBagConfig)],
                                   is_weighted=True)
    scripted = _save_load(torch.jit.script(ebc))
    traced = _save_load(torch.jit.script(torchrec.fx.symbolic_trace(ebc)))
    assert not hasattr(ebc, "fused_optimizer")
    for seed, keys in enumerate((["a", "b", "c"], ["c", "x", "a", "b"])):
        kjt = _kjt(keys, 5, seed, weighted=True)
        want = ebc(kjt)
        for module in (scripted, traced):
            got = module(kjt)
            assert got.keys() == want.keys() == ["a", "b", "c"]
            assert torch.equal(got.values(), want.values())
    # The scripted module still names a missing feature.
    with pytest.raises(Exception, match=r"lacks the features 'a' \(table 't_small'\)"):
        scripted(_kjt(["b", "c"], 2, 0, weighted=True))


def test_script_with_fused_params() -> None:
    tables = [t for t in _tables() if isinstance(t, TTEmbeddingBagConfig)]
    ebc = TTEmbeddingBagCollection(tables, fused_params={"optimizer": "exact_sgd", "lr": 0.1,
                                                         "compute_precision": "fp16"})
    kjt = _kjt(["a", "b", "c"], 3, 1)
    assert torch.equal(torch.jit.script(ebc)(kjt).values(), ebc(kjt).values())


def test_hybrid_dlrm_scripts_and_exports_with_the_eager_outputs() -> None:
    model = _dlrm()
    model.eval()
    scripted = _save_load(torch.jit.script(torchrec.fx.symbolic_trace(model)))
    dense, kjt = _inputs(1)
    exported = _export(model, dense, kjt)
    for seed in (1, 2, 5):
        dense, kjt = _inputs(seed)
        if seed == 5:  # another batch size (export fixes the keys, not the sizes)
            dense, kjt = dense[:3], _kjt(["e", "zz", "c", "a", "d", "b"], 3, seed)
        want = model(dense, kjt)
        assert torch.equal(scripted(dense, kjt), want)
        torch.testing.assert_close(exported(dense, kjt), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ quantized serving


def _tt_of(model: DLRM) -> torch.nn.Module:
    return model.sparse_arch.embedding_bag_collection.tt


def test_rule_materialises_small_tables_and_keeps_big_ones_as_cores() -> None:
    model = _dlrm()
    small = dense_quantized_bytes(_tables()[0], torch.qint8)
    assert small == 300 * 16  # D=8 int8 + 4 bytes of scale/bias, rows padded to 16 bytes
    q = quantize_embeddings(model, torch.qint8, inplace=False, materialize_max_bytes=small)
    modes = _tt_of(q).table_modes()
    assert modes["t_small"]["mode"] == "dense" and modes["t_small"]["dtype"] == torch.qint8
    assert modes["t_big"]["mode"] == "cores" and modes["t_big"]["dtype"] == torch.uint8
    assert isinstance(q.sparse_arch.embedding_bag_collection.ebc, QuantEBC)
    # Forced modes and a smaller limit.
    q2 = quantize_embeddings(model, torch.qint8, inplace=False, materialize_max_bytes=small - 1,
                             per_table_mode={"t_big": "dense"})
    assert {n: m["mode"] for n, m in _tt_of(q2).table_modes().items()} == {
        "t_small": "cores", "t_big": "dense"}
    with pytest.raises(ValueError, match=r"per_table_mode names tables \['nope'\]"):
        quantize_embeddings(model, torch.qint8, inplace=False, per_table_mode={"nope": "dense"})
    with pytest.raises(ValueError, match="per_table_mode values must be one of"):
        quantize_embeddings(model, torch.qint8, inplace=False, per_table_mode={"t_big": "int3"})


def test_fp16_cores_compute_what_fp16_precision_computes() -> None:
    tables = [t for t in _tables() if isinstance(t, TTEmbeddingBagConfig)]
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(tables)
    rounded = TTEmbeddingBagCollection(copy.deepcopy(tables),
                                       fused_params={"compute_precision": "fp16"})
    rounded.load_state_dict(ebc.state_dict())
    q = QuantTTEmbeddingBagCollection(ebc, weight_dtype=torch.float16, materialize_max_bytes=0)
    assert {m["dtype"] for m in q.table_modes().values()} == {torch.float16}
    kjt = _kjt(["a", "b", "c"], 6, 3)
    torch.testing.assert_close(q(kjt).values(), rounded(kjt).values(), rtol=1e-6, atol=1e-7)
    fp32_bytes = sum(c.numel() * 4 for c in ebc.cores())
    assert q.size_bytes() == fp32_bytes // 2


def test_int8_cores_are_within_half_a_step_per_slice() -> None:
    torch.manual_seed(0)
    core = torch.randn(37, 48)
    core[5] = 0.25  # a constant slice is kept exactly
    q = _Int8Cores([core, torch.randn(3, 4)])
    deq = q.dequantized()[0]
    step = (core.max(dim=1).values - core.min(dim=1).values) / 255
    assert bool(((deq - core).abs() <= step[:, None] / 2 + 1e-6).all())
    assert torch.equal(deq[5], core[5])
    assert q.core_0.dtype == torch.uint8


def test_quantized_model_outputs_size_and_scripting() -> None:
    model = _dlrm()
    model.eval()
    dense, kjt = _inputs(3)
    want = model(dense, kjt)
    fp32_tt = sum(c.numel() * 4 for c in _tt_of(model).cores())
    for dtype, ratio, atol in ((torch.float16, 0.5, 1e-3), (torch.qint8, 0.3, 2e-2)):
        q = quantize_embeddings(model, dtype, inplace=False, materialize_max_bytes=0)
        assert _tt_of(q).size_bytes() <= ratio * fp32_tt
        got = q(dense, kjt)
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
        scripted = _save_load(torch.jit.script(torchrec.fx.symbolic_trace(q)))
        assert torch.equal(scripted(dense, kjt), got)
        exported = _export(q, dense, kjt)
        torch.testing.assert_close(exported(dense, kjt), got, rtol=0, atol=1e-6)
    # Materialised: TT tables in TorchRec's quantized dense tables.
    q = quantize_embeddings(model, torch.float16, inplace=False, materialize_max_bytes=1 << 30)
    assert {m["mode"] for m in _tt_of(q).table_modes().values()} == {"dense"}
    torch.testing.assert_close(q(dense, kjt), want, rtol=0, atol=1e-3)


def _tt_dlrm(seed: int = 0) -> DLRM:
    """A DLRM whose sparse arch is a bare TT collection (both tables too big to materialise)."""
    torch.manual_seed(seed)
    tables = [
        TTEmbeddingBagConfig(name="t_a", num_embeddings=150_000, embedding_dim=D,
                             feature_names=["a"], tt_ranks=[8, 8]),
        TTEmbeddingBagConfig(name="t_b", num_embeddings=200_000, embedding_dim=D,
                             feature_names=["b", "c"], tt_ranks=[8, 8]),
    ]
    model = DLRM(embedding_bag_collection=TTEmbeddingBagCollection(tables), dense_in_features=3,
                 dense_arch_layer_sizes=[8, D], over_arch_layer_sizes=[8, 1])
    return model.eval()


def _sparse(model: DLRM) -> torch.nn.Module:
    return model.sparse_arch.embedding_bag_collection


_LEFT_FLOAT = r"was left float32 by torch.ao.quantization"


def test_torchrec_quantize_inference_model_quantizes_a_bare_tt_collection() -> None:
    # TorchRec's inference entry point, no argument: TT's entry is in its DEFAULT_QUANT_MAPPING.
    model = _tt_dlrm()
    dense, kjt = _inputs(4)
    want = model(dense, kjt)
    fp32_bytes = sum(c.numel() * 4 for c in _sparse(model).cores())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*" + _LEFT_FLOAT)
        q = trec_inference.quantize_inference_model(copy.deepcopy(model))
    tt = _sparse(q)
    assert isinstance(tt, QuantTTEmbeddingBagCollection)
    assert {n: (m["mode"], m["dtype"]) for n, m in tt.table_modes().items()} == {
        "t_a": ("cores", torch.uint8), "t_b": ("cores", torch.uint8)}  # its default: int8
    assert tt.size_bytes() <= 0.3 * fp32_bytes
    got = q(dense, kjt)
    # Within the quantization error: the float model on the dequantized cores gives the same
    # logits (the quantized cores are within half a step of the float ones, tested above) ...
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, table in tt.tt.tables.items():
            cores = _sparse(rounded).embedding_bags[name].cores()
            for core, deq in zip(cores, table.dequantized()):
                core.copy_(deq)
    torch.testing.assert_close(got, rounded(dense, kjt), rtol=0, atol=1e-6)
    # ... and they stay near the float model's.
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    # TorchRec's quantize_embeddings given TT's mapping takes the same path.
    q2 = trec_inference.quantize_embeddings(
        copy.deepcopy(model), dtype=torch.qint8, inplace=True,
        additional_qconfig_spec_keys=[TTEmbeddingBagCollection],
        additional_mapping={TTEmbeddingBagCollection: QuantTTEmbeddingBagCollection})
    assert isinstance(_sparse(q2), QuantTTEmbeddingBagCollection)
    assert torch.equal(q2(dense, kjt), got)
    # A hybrid collection: both children quantized.
    hybrid = trec_inference.quantize_inference_model(_dlrm().eval())
    assert isinstance(_sparse(hybrid).ebc, QuantEBC)
    assert isinstance(_sparse(hybrid).tt, QuantTTEmbeddingBagCollection)


def test_torchrec_quantize_embeddings_without_tt_mapping_warns() -> None:
    dense, kjt = _inputs(4)
    model = _tt_dlrm()
    want = model(dense, kjt)
    with pytest.warns(UserWarning, match=r"TTEmbeddingBagCollection \(TT tables \['t_a', 't_b'\]\) "
                      + _LEFT_FLOAT + r".*not in the qconfig_spec.*torchrec_tt\.inference\."
                      r"quantize_embeddings"):
        trec_inference.quantize_embeddings(model, dtype=torch.qint8, inplace=True)
    assert type(_sparse(model)) is TTEmbeddingBagCollection
    assert not hasattr(_sparse(model), "qconfig")
    assert torch.equal(model(dense, kjt), want)
    # The root module is never swapped by torch.ao's convert, mapping or not.
    root = _tt_dlrm().sparse_arch.embedding_bag_collection
    with pytest.warns(UserWarning, match=r"had a qconfig but was not swapped .*root module"):
        trec_inference.quantize_embeddings(
            root, dtype=torch.qint8, inplace=True,
            additional_qconfig_spec_keys=[TTEmbeddingBagCollection],
            additional_mapping={TTEmbeddingBagCollection: QuantTTEmbeddingBagCollection})
    # In a hybrid collection the plain child is quantized and the TT child warns, once.
    model = _dlrm()
    left = r"TT tables \['t_small', 't_big'\]\) " + _LEFT_FLOAT
    with pytest.warns(UserWarning, match=left) as rec:
        trec_inference.quantize_embeddings(model, dtype=torch.qint8, inplace=True)
    assert sum(_LEFT_FLOAT in str(w.message) for w in rec) == 1
    assert isinstance(model.sparse_arch.embedding_bag_collection.ebc, QuantEBC)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*float32")
        model(dense, _inputs(4)[1])


def test_quantize_rejects_bad_arguments() -> None:
    ebc = TTEmbeddingBagCollection([_tables()[0]])
    with pytest.raises(ValueError, match="core_dtype torch.int16 is not supported"):
        QuantTTEmbeddingBagCollection(ebc, core_dtype=torch.int16)
    with pytest.raises(ValueError, match="materialize_max_bytes must be an int >= 0"):
        QuantTTEmbeddingBagCollection(ebc, materialize_max_bytes=-1)
    with pytest.raises(ValueError, match="meta device"):
        QuantTTEmbeddingBagCollection(TTEmbeddingBagCollection([_tables()[0]], device="meta"))


# ------------------------------------------------------------------ the example


def test_export_and_serve_example_runs(tmp_path: Path) -> None:
    import importlib.util
    import sys

    path = ROOT / "examples" / "inference" / "export_and_serve.py"
    spec = importlib.util.spec_from_file_location("export_and_serve", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules["export_and_serve"] = example
    spec.loader.exec_module(example)
    summary = example.main(["--scale", "0.0005", "--steps", "3", "--batch_size", "64",
                            "--eval_samples", "256", "--out", str(tmp_path), "--no_export"])
    rows = {r["model"]: r for r in summary["rows"]}
    assert rows["fx + TorchScript (saved, loaded)"]["max_abs_logit_diff"] == 0.0
    assert "torch.export (saved, loaded)" not in rows  # (~20 s; the export test is above)
    for label in ("fp16", "int8"):
        eager = rows[f"{label} embeddings (eager)"]
        scripted = rows[f"{label} embeddings, fx + TorchScript (saved, loaded)"]
        assert 0 < eager["max_abs_logit_diff"] < 0.05
        assert scripted["max_abs_logit_diff"] == eager["max_abs_logit_diff"]
    assert len(summary["tt_tables"]) == 7
    for name in ("model_fp32.pt", "model_fp16.pt", "model_int8.pt",
                 "summary.json"):
        assert (tmp_path / name).exists()
