"""Quantized serving of TT tables, TorchRec's inference path.

TorchRec serves a model by quantizing its embedding tables
(``torchrec.inference.modules.quantize_embeddings``: each ``EmbeddingBagCollection`` becomes a
``torchrec.quant.EmbeddingBagCollection`` of int8 / int4 / fp16 rows), fx-tracing it and
scripting it. TorchRec's function only knows its own EBC; this module adds the TT side.

:func:`quantize_embeddings` (same arguments as TorchRec's, plus the TT rule) quantizes both: the
plain tables through TorchRec, and each ``TTEmbeddingBagCollection`` into a
:class:`QuantTTEmbeddingBagCollection`. Per TT table, the rule is:

* **dense** when the table, materialised (``N x D`` reconstructed from the cores) and stored in
  TorchRec's quantized format at the table's weight dtype, takes at most
  ``materialize_max_bytes`` (default 1 MiB): it becomes a row of a TorchRec quantized EBC (one
  gather per lookup, TorchRec's own kernels; error: the dtype's rounding of the rows);
* **cores** otherwise: the table stays TT, its cores stored as fp16 / bf16 (a float16 / bfloat16
  weight dtype), or as row-wise int8 (8-bit weight dtypes: every core slice quantized with its
  own scale and offset), and dequantized to float32 for the TT kernel at each call. A 4- or
  2-bit weight dtype keeps fp16 cores (TT cores have too few values per slice for 4-bit rows to
  hold their dynamic range); ``core_dtype`` overrides the choice.

``per_table_mode`` forces a table to ``"dense"`` or ``"cores"``. The per-table choice, bytes
and core dtype are in ``QuantTTEmbeddingBagCollection.table_modes()`` / ``size_bytes()``.

TorchRec's own entry points:

* ``torchrec.inference.modules.quantize_inference_model(model)`` quantizes TT collections
  through :class:`QuantTTEmbeddingBagCollection` (default rule): importing ``torchrec_tt`` adds
  TT's entry (:data:`QUANT_MAPPING`) to TorchRec's ``DEFAULT_QUANT_MAPPING``, the module-type
  mapping that function swaps by. A ``quantization_mapping=`` of one's own takes it with
  ``{**mine, **QUANT_MAPPING}``.
* ``torchrec.inference.modules.quantize_embeddings`` builds its module mapping inside the call
  (TorchRec's EBC only), so it converts TT collections only when told::

    torchrec.inference.modules.quantize_embeddings(
        model, dtype=torch.qint8, inplace=True,
        additional_qconfig_spec_keys=[TTEmbeddingBagCollection],
        additional_mapping={TTEmbeddingBagCollection: QuantTTEmbeddingBagCollection})

  Without them (or when the TT collection is the root module, which torch.ao's convert never
  swaps) every TT collection it leaves float32 warns, naming its tables and these fixes.

The quantized modules script after ``torchrec.fx.symbolic_trace`` (as TorchRec's quantized EBC
needs) and export.
"""

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes
from torch import Tensor, nn
from torchrec.inference.modules import DEFAULT_QUANT_MAPPING
from torchrec.inference.modules import quantize_embeddings as _torchrec_quantize_embeddings
from torchrec.modules.embedding_configs import (
    EmbeddingBagConfig,
    QuantConfig,
    data_type_to_sparse_type,
    dtype_to_data_type,
)
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.quant.embedding_modules import DEFAULT_ROW_ALIGNMENT
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_tt.configs import TTEmbeddingBagConfig
from torchrec_tt.modules.embedding_bag import TTEmbeddingBagCollection, _TTLookupMixin
from torchrec_tt.modules.hot_cache import refuse_hot_cache
from torchrec_tt.ops import TTBatchLayout
from torchrec_tt.swap import _child_names, _merge_pooled

# A leaf of torchrec.fx traces here too (torch.fx.wrap patches one module's globals).
torch.fx.wrap("_merge_pooled")

__all__ = [
    "DEFAULT_MATERIALIZE_MAX_BYTES",
    "QUANT_MAPPING",
    "QuantTTEmbeddingBagCollection",
    "kjt_dynamic_shapes",
    "quantize_embeddings",
]

#: Largest quantized dense form of a TT table that ``quantize_embeddings`` materialises.
DEFAULT_MATERIALIZE_MAX_BYTES = 1 << 20

_FLOAT_CORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT8_DTYPES = (torch.qint8, torch.quint8, torch.int8, torch.uint8)
_MODES = ("dense", "cores")


def kjt_dynamic_shapes(kjt: KeyedJaggedTensor) -> List[Optional[Dict[int, Any]]]:
    """``torch.export`` ``dynamic_shapes`` entry for a KJT argument: every tensor the KJT holds
    (values, weights, lengths, offsets, in its pytree order) has a dynamic first dimension, so
    the exported program takes any batch and any number of ids (without it, export fixes them
    to the example's)."""
    tensors = [getattr(kjt, name) for name in KeyedJaggedTensor._fields]
    return [None if t is None else {0: torch.export.Dim.AUTO} for t in tensors]


def dense_quantized_bytes(cfg: EmbeddingBagConfig, dtype: torch.dtype) -> int:
    """Bytes of the table as a TorchRec quantized dense table at ``dtype`` (FBGEMM's row format:
    rows padded to 16 bytes, int8/int4 rows with their fp16 scale and bias)."""
    sparse = data_type_to_sparse_type(dtype_to_data_type(dtype))
    return cfg.num_embeddings * rounded_row_size_in_bytes(
        cfg.embedding_dim, sparse, DEFAULT_ROW_ALIGNMENT
    )


def _core_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    if weight_dtype in _FLOAT_CORE_DTYPES:
        return weight_dtype
    if weight_dtype in _INT8_DTYPES:
        return torch.uint8
    return torch.float16  # 4 / 2-bit (see the module docstring)


class _FloatCores(nn.Module):
    """Cores of one TT table stored in a float dtype (buffers ``core_k``)."""

    def __init__(self, cores: Sequence[Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        for k, core in enumerate(cores):
            self.register_buffer(f"core_{k}", core.detach().to(dtype).contiguous())

    def dequantized(self) -> List[Tensor]:
        # hasattr is resolved when TorchScript compiles (2-4 cores).
        out = [self.core_0.float(), self.core_1.float()]
        if hasattr(self, "core_2"):
            out.append(self.core_2.float())
        if hasattr(self, "core_3"):
            out.append(self.core_3.float())
        return out


def _quantize_rows(core: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise asymmetric uint8: ``(codes, [rows, 2] float32 scale and offset)``."""
    x = core.detach().float()
    low = x.min(dim=1).values
    high = x.max(dim=1).values
    scale = (high - low) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant rows: exact
    codes = ((x - low[:, None]) / scale[:, None]).round_().clamp_(0, 255).to(torch.uint8)
    return codes, torch.stack([scale, low], dim=1)


class _Int8Cores(nn.Module):
    """Cores of one TT table as row-wise uint8 codes (``core_k``) with a float32 scale and
    offset per core slice (``core_k_qparams``, ``[p_k, 2]``)."""

    def __init__(self, cores: Sequence[Tensor]) -> None:
        super().__init__()
        for k, core in enumerate(cores):
            codes, qparams = _quantize_rows(core)
            self.register_buffer(f"core_{k}", codes)
            self.register_buffer(f"core_{k}_qparams", qparams)

    @staticmethod
    def _dequantize(codes: Tensor, qparams: Tensor) -> Tensor:
        return codes.float() * qparams[:, 0:1] + qparams[:, 1:2]

    def dequantized(self) -> List[Tensor]:
        out = [
            self._dequantize(self.core_0, self.core_0_qparams),
            self._dequantize(self.core_1, self.core_1_qparams),
        ]
        if hasattr(self, "core_2"):
            out.append(self._dequantize(self.core_2, self.core_2_qparams))
        if hasattr(self, "core_3"):
            out.append(self._dequantize(self.core_3, self.core_3_qparams))
        return out


class _QuantTTCores(nn.Module, _TTLookupMixin):
    """The TT tables kept as (quantized) cores: dequantizes them and runs the TT op."""

    def __init__(
        self,
        module: TTEmbeddingBagCollection,
        tables: Sequence[TTEmbeddingBagConfig],
        core_dtypes: Mapping[str, torch.dtype],
        output_dtype: torch.dtype,
    ) -> None:
        super().__init__()
        names = [t.name for t in tables]
        shapes = [module.tt_shapes()[n] for n in names]
        features: List[str] = []
        feature_table_map: List[int] = []
        for i, t in enumerate(tables):
            features.extend(t.feature_names)
            feature_table_map.extend([i] * len(t.feature_names))
        pooling = dict(zip(module._op_table_names, module._op_pooling_modes))
        layout = TTBatchLayout.from_shapes(
            names, shapes, [pooling[n] for n in names], feature_table_map
        )
        self._set_op_args(layout, module._op_bounds_check_mode)
        self._feature_names = features
        self._feature_tables = [names[t] for t in feature_table_map]
        self._embedding_names: List[str] = [
            n for ns in get_embedding_names_by_table(list(tables)) for n in ns
        ]
        self._lengths_per_key = layout.feature_dims()
        self._is_weighted = module.is_weighted()
        self._output_dtype = output_dtype
        self.tables = nn.ModuleDict()
        for n in names:
            cores = module._table(n).cores()
            dtype = core_dtypes[n]
            self.tables[n] = _Int8Cores(cores) if dtype == torch.uint8 else _FloatCores(cores, dtype)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        cores: List[Tensor] = []
        for table in self.tables.values():
            cores.extend(table.dequantized())
        # FP32: the cores are already rounded to their storage dtype.
        keys, lengths, values = self._pooled(features, cores, 1, False)
        return KeyedTensor(keys=keys, length_per_key=lengths, values=values.to(self._output_dtype))


class QuantTTEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A quantized ``TTEmbeddingBagCollection`` for inference (see the module docstring for the
    per-table rule). Same contract: KJT in, ``KeyedTensor`` out with the float module's keys.

    Children: ``dense`` (a TorchRec ``quant.EmbeddingBagCollection`` of the materialised tables)
    and ``tt`` (the tables kept as quantized cores); either is None when it holds no table.
    Build it with :meth:`from_float` or :func:`quantize_embeddings`.
    """

    def __init__(
        self,
        module: TTEmbeddingBagCollection,
        weight_dtype: torch.dtype = torch.qint8,
        output_dtype: torch.dtype = torch.float,
        per_table_weight_dtype: Optional[Mapping[str, torch.dtype]] = None,
        materialize_max_bytes: int = DEFAULT_MATERIALIZE_MAX_BYTES,
        per_table_mode: Optional[Mapping[str, str]] = None,
        core_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, TTEmbeddingBagCollection):
            raise TypeError(f"expected a TTEmbeddingBagCollection, got {type(module).__name__}")
        configs = module.embedding_bag_configs()
        refuse_hot_cache(
            configs, "QuantTTEmbeddingBagCollection",
            "the quantized module stores the cores only, so the cached rows (the slab) would be lost",
        )
        names = [c.name for c in configs]
        per_table_weight_dtype = dict(per_table_weight_dtype or {})
        per_table_mode = dict(per_table_mode or {})
        for what, mapping in (("per_table_weight_dtype", per_table_weight_dtype),
                              ("per_table_mode", per_table_mode)):
            unknown = sorted(set(mapping) - set(names))
            if unknown:
                raise ValueError(f"{what} names tables {unknown} that are not TT tables here ({names})")
        bad = {n: m for n, m in per_table_mode.items() if m not in _MODES}
        if bad:
            raise ValueError(f"per_table_mode values must be one of {list(_MODES)}, got {bad}")
        if not isinstance(materialize_max_bytes, int) or materialize_max_bytes < 0:
            raise ValueError(f"materialize_max_bytes must be an int >= 0, got {materialize_max_bytes!r}")
        if core_dtype is not None and core_dtype not in (*_FLOAT_CORE_DTYPES, torch.uint8):
            raise ValueError(
                f"core_dtype {core_dtype} is not supported; choose torch.float16, torch.bfloat16, "
                "torch.float32 or torch.uint8 (row-wise int8)"
            )
        if module.device.type == "meta":
            raise ValueError("cannot quantize a TTEmbeddingBagCollection on the meta device")
        self._embedding_bag_configs = configs
        self._is_weighted = module.is_weighted()
        self._table_modes: Dict[str, Dict[str, Any]] = {}
        dense_tables: List[EmbeddingBagConfig] = []
        core_tables: List[TTEmbeddingBagConfig] = []
        core_dtypes: Dict[str, torch.dtype] = {}
        for cfg in configs:
            wdtype = per_table_weight_dtype.get(cfg.name, weight_dtype)
            dense_bytes = dense_quantized_bytes(cfg, wdtype)
            mode = per_table_mode.get(
                cfg.name, "dense" if dense_bytes <= materialize_max_bytes else "cores"
            )
            if mode == "dense":
                dense_tables.append(cfg)
                self._table_modes[cfg.name] = {"mode": "dense", "dtype": wdtype, "bytes": dense_bytes}
            else:
                cdtype = core_dtype if core_dtype is not None else _core_dtype_for(wdtype)
                core_tables.append(cfg)
                core_dtypes[cfg.name] = cdtype
                self._table_modes[cfg.name] = {"mode": "cores", "dtype": cdtype, "bytes": 0}
        # (No annotated None attributes in __init__: TorchScript warns on them.)
        self.dense = (
            _materialise(module, dense_tables, weight_dtype, output_dtype, per_table_weight_dtype)
            if dense_tables
            else None
        )
        self.tt = _QuantTTCores(module, core_tables, core_dtypes, output_dtype) if core_tables else None
        if self.tt is not None:
            for name, table in self.tt.tables.items():
                self._table_modes[name]["bytes"] = sum(
                    b.numel() * b.element_size() for b in table.buffers()
                )
        global_names = dict(zip(names, get_embedding_names_by_table(list(configs))))
        self._embedding_names: List[str] = [n for c in configs for n in global_names[c.name]]
        self._dense_keys, self._dense_names = _child_names(dense_tables, global_names)
        self._tt_keys, self._tt_names = _child_names(core_tables, global_names)

    @classmethod
    def from_float(
        cls, module: TTEmbeddingBagCollection, use_precomputed_fake_quant: bool = False
    ) -> "QuantTTEmbeddingBagCollection":
        """TorchRec's conversion hook (``quantize_embeddings(..., additional_mapping=...)``):
        reads the weight / output dtypes from ``module.qconfig``; the default table rule."""
        qconfig = getattr(module, "qconfig", None)
        if qconfig is None:
            raise ValueError("QuantTTEmbeddingBagCollection.from_float needs module.qconfig")
        per_table = getattr(qconfig, "per_table_weight_dtype", None) if isinstance(qconfig, QuantConfig) else None
        return cls(
            module,
            weight_dtype=qconfig.weight().dtype,
            output_dtype=qconfig.activation().dtype,
            per_table_weight_dtype=per_table,
        )

    # TorchScript compiles properties; these are Python-side only.
    __jit_unused_properties__ = ["device"]

    @property
    def device(self) -> torch.device:
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return list(self._embedding_bag_configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    def table_modes(self) -> Dict[str, Dict[str, Any]]:
        """Per table: ``mode`` (``"dense"`` or ``"cores"``), ``dtype`` (the dense table's weight
        dtype, or the cores' storage dtype; ``torch.uint8`` is row-wise int8) and ``bytes``."""
        return copy.deepcopy(self._table_modes)

    def size_bytes(self) -> int:
        """Bytes of every stored tensor (quantized rows, cores, scales and offsets)."""
        return sum(b.numel() * b.element_size() for b in self.buffers()) + sum(
            p.numel() * p.element_size() for p in self.parameters()
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        dense: Optional[KeyedTensor] = None
        tt: Optional[KeyedTensor] = None
        if self.dense is not None:
            dense = self.dense(features)
        if self.tt is not None:
            tt = self.tt(features)
        return _merge_pooled(
            dense, tt, None, self._dense_keys, self._dense_names, self._tt_keys, self._tt_names,
            [], [], self._embedding_names,
        )


#: TT's entry of TorchRec's ``quantize_inference_model`` mapping (module typename -> quantized
#: type, the form ``torchrec.inference.modules.DEFAULT_QUANT_MAPPING`` has).
QUANT_MAPPING: Dict[str, type] = {
    torch.typename(TTEmbeddingBagCollection): QuantTTEmbeddingBagCollection,
}
# quantize_inference_model reads DEFAULT_QUANT_MAPPING at each call (when not given a mapping),
# so with TT's entry TorchRec's inference path quantizes TT collections as it does its EBCs; the
# key is our type's name, so no other module is affected.
for _name, _quant in QUANT_MAPPING.items():
    DEFAULT_QUANT_MAPPING.setdefault(_name, _quant)


@torch.no_grad()
def _materialise(
    module: TTEmbeddingBagCollection,
    tables: Sequence[EmbeddingBagConfig],
    weight_dtype: torch.dtype,
    output_dtype: torch.dtype,
    per_table_weight_dtype: Mapping[str, torch.dtype],
) -> QuantEmbeddingBagCollection:
    """TorchRec's quantized EBC holding the dense reconstructions of ``tables``."""
    plain = [
        EmbeddingBagConfig(
            name=t.name,
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            feature_names=list(t.feature_names),
            pooling=t.pooling,
        )
        for t in tables
    ]
    ebc = EmbeddingBagCollection(plain, is_weighted=module.is_weighted(), device=module.device)
    for t in tables:
        ebc.embedding_bags[t.name].weight.copy_(module.full_weight(t.name))
    ebc.qconfig = _qconfig(weight_dtype, output_dtype, per_table_weight_dtype)
    return QuantEmbeddingBagCollection.from_float(ebc)


def _qconfig(
    weight_dtype: torch.dtype,
    output_dtype: torch.dtype,
    per_table_weight_dtype: Optional[Mapping[str, torch.dtype]] = None,
) -> QuantConfig:
    # The qconfig TorchRec's quantize_embeddings builds.
    return QuantConfig(
        activation=torch.quantization.PlaceholderObserver.with_args(dtype=output_dtype),
        weight=torch.quantization.PlaceholderObserver.with_args(dtype=weight_dtype),
        per_table_weight_dtype=dict(per_table_weight_dtype) if per_table_weight_dtype else None,
    )


def quantize_embeddings(
    module: nn.Module,
    dtype: torch.dtype,
    inplace: bool,
    additional_qconfig_spec_keys: Optional[List[type]] = None,
    additional_mapping: Optional[Dict[type, type]] = None,
    output_dtype: torch.dtype = torch.float,
    per_table_weight_dtype: Optional[Dict[str, torch.dtype]] = None,
    materialize_max_bytes: int = DEFAULT_MATERIALIZE_MAX_BYTES,
    per_table_mode: Optional[Mapping[str, str]] = None,
    core_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """``torchrec.inference.modules.quantize_embeddings`` that also quantizes TT tables.

    The first arguments are TorchRec's (``dtype``: the weight dtype, e.g. ``torch.qint8`` or
    ``torch.float16``; ``per_table_weight_dtype`` may name TT tables too); the others set the TT
    rule (module docstring). Every ``TTEmbeddingBagCollection`` in ``module`` (``module`` itself
    included) becomes a :class:`QuantTTEmbeddingBagCollection`, then TorchRec quantizes the
    plain EBCs. Returns the quantized module (``module`` itself when ``inplace``).
    """
    if not inplace:
        module = copy.deepcopy(module)
    names = [n for n, m in module.named_modules() if isinstance(m, TTEmbeddingBagCollection)]
    tt_tables = {
        c.name
        for n in names
        for c in module.get_submodule(n).embedding_bag_configs()
    }
    tt_weight_dtypes = {k: v for k, v in (per_table_weight_dtype or {}).items() if k in tt_tables}
    tt_modes = dict(per_table_mode or {})
    unknown = sorted(set(tt_modes) - tt_tables)
    if unknown:
        raise ValueError(f"per_table_mode names tables {unknown} that are not TT tables of the model")

    def convert(tt: TTEmbeddingBagCollection) -> QuantTTEmbeddingBagCollection:
        own = {c.name for c in tt.embedding_bag_configs()}
        return QuantTTEmbeddingBagCollection(
            tt,
            weight_dtype=dtype,
            output_dtype=output_dtype,
            per_table_weight_dtype={k: v for k, v in tt_weight_dtypes.items() if k in own},
            materialize_max_bytes=materialize_max_bytes,
            per_table_mode={k: v for k, v in tt_modes.items() if k in own},
            core_dtype=core_dtype,
        )

    if isinstance(module, TTEmbeddingBagCollection):
        return convert(module)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, convert(module.get_submodule(name)))
    plain_weight_dtypes = {
        k: v for k, v in (per_table_weight_dtype or {}).items() if k not in tt_tables
    }
    return _torchrec_quantize_embeddings(
        module,
        dtype=dtype,
        inplace=True,
        additional_qconfig_spec_keys=additional_qconfig_spec_keys,
        additional_mapping=additional_mapping,
        output_dtype=output_dtype,
        per_table_weight_dtype=plain_weight_dtypes or None,
    )
