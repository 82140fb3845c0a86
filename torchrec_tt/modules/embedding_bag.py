"""TTEmbeddingBagCollection: TorchRec's EmbeddingBagCollection contract over TT tables."""

# No ``from __future__ import annotations``: torch.fx copies forward's annotations into traced
# code and TorchScript must resolve them, so they have to be real types, not strings.
import functools
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple

import torch
from tensordict import TensorDict
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.sparse.tensor_dict import maybe_td_to_kjt

from torchrec_tt.configs import TTEmbeddingBagConfig, TTInit
from torchrec_tt.initializers import (
    default_target_std,
    orthogonal_cores,
    sampled_gaussian_cores,
    tt_svd,
)
from torchrec_tt.modules import hot_cache
from torchrec_tt.ops import PoolingMode, TTBatchLayout, TTKernelOptions, tt_embedding_bag
from torchrec_tt.optim import FusedOptimConfig, TTFusedOptimizer
from torchrec_tt.reference import reconstruct_dense
from torchrec_tt.shapes import TTShape

__all__ = ["TTEmbeddingBagCollection", "TTEmbeddingTable"]

_POOLING = {PoolingType.SUM: PoolingMode.SUM, PoolingType.MEAN: PoolingMode.MEAN}


def _quoted(names: List[str]) -> str:
    """``['a', 'b']`` (Python's list repr, also under TorchScript, whose f-strings drop quotes)."""
    return "[" + ", ".join(["'" + n + "'" for n in names]) + "]"


def _as_kjt(features: Any) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor from a KJT or a TensorDict of jagged features (as TorchRec 1.6's EBC
    takes, converted the same way by ``torchrec.sparse.tensor_dict.maybe_td_to_kjt``)."""
    if isinstance(features, KeyedJaggedTensor):
        return features
    if isinstance(features, TensorDict):
        return maybe_td_to_kjt(features, None)
    raise TypeError(
        f"expected a KeyedJaggedTensor (or a TensorDict of jagged features), got "
        f"{type(features).__name__}"
    )


def padded_vbe_offsets(lengths: Tensor, strides: List[int]) -> Tensor:
    """Offsets of a variable-batch (VBE) KJT's bags with each feature's ``strides[f]`` bags padded
    by empty ones to the largest stride: the one batch size the TT op takes. Its output rows
    ``b >= strides[f]`` of feature ``f`` are then zero padding."""
    widest = max(strides)
    padded: List[Tensor] = []
    for seg, stride in zip(torch.split(lengths, strides), strides):
        padded.append(torch.nn.functional.pad(seg, [0, widest - stride]))
    return torch.ops.fbgemm.asynchronous_complete_cumsum(torch.cat(padded))


@torch.fx.wrap
def _lookup_inputs(
    features: KeyedJaggedTensor,
    feature_names: List[str],
    feature_tables: List[str],
    is_weighted: bool,
    core: Tensor,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Checks a KJT against the collection and returns its ``(indices, offsets, weights)`` with
    the collection's features in its order (weights cast to the cores' dtype when weighted).

    Keys that match no table are ignored, as in TorchRec's ``EmbeddingBagCollection`` (one KJT
    can feed several collections); a missing feature is an error. A feature of several tables
    (TorchRec's shared features) appears once per table in ``feature_names``: its ids are looked
    up in each. Written in the TorchScript subset (scripted models call it)."""
    if not torch.jit.is_scripting():
        features = _as_kjt(features)
    keys = features.keys()
    # (Read before the permute below, which drops them; _expand_inverse_indices reads them
    # from the caller's KJT.)
    has_inverse = features.inverse_indices_or_none() is not None
    if keys != feature_names:
        index: Dict[str, int] = {}
        duplicated: List[str] = []
        for i, k in enumerate(keys):
            if k in index:
                if k in feature_names and k not in duplicated:
                    duplicated.append(k)
            else:
                index[k] = i
        if len(duplicated) > 0:
            raise ValueError(
                "KeyedJaggedTensor has the keys " + _quoted(sorted(duplicated)) + " more than once"
            )
        missing: List[str] = []
        for f, t in zip(feature_names, feature_tables):
            if f not in index:
                missing.append("'" + f + "' (table '" + t + "')")
        if len(missing) > 0:
            raise ValueError(
                "KeyedJaggedTensor (keys " + _quoted(keys) + ") lacks the features "
                + ", ".join(missing)
            )
        # Selects (and orders) the collection's features; the other keys are dropped.
        features = features.permute([index[f] for f in feature_names])
    offsets = features.offsets()
    if features.variable_stride_per_key():
        # VBE: feature f has its own batch size B_f. Its bags are padded with empty ones to the
        # largest B_f, so the op sees one batch size; _expand_inverse_indices then picks each
        # sample's row through the KJT's inverse indices, as TorchRec's EBC does.
        if not has_inverse:
            raise ValueError(
                "variable batch size per feature (VBE) needs the KeyedJaggedTensor's "
                "inverse_indices (as TorchRec's EmbeddingBagCollection)"
            )
        offsets = padded_vbe_offsets(features.lengths(), features.stride_per_key())
    values = features.values()
    if values.device != core.device:
        raise ValueError(
            "KeyedJaggedTensor is on " + str(values.device) + " but the cores of TT tables "
            + _quoted(sorted(_unique(feature_tables))) + " are on " + str(core.device)
        )
    weights: Optional[Tensor] = None
    if is_weighted:
        weights = features.weights_or_none()
        if weights is None:
            raise ValueError(
                "TTEmbeddingBagCollection(is_weighted=True) got a KeyedJaggedTensor without "
                "weights (tables " + _quoted(sorted(_unique(feature_tables))) + ")"
            )
        weights = weights.to(core.dtype)
    return values, offsets, weights


@torch.fx.wrap
def _expand_inverse_indices(
    pooled: Tensor, features: KeyedJaggedTensor, feature_names: List[str], dims: List[int]
) -> Tensor:
    """With the KJT's inverse indices (VBE, deduplicated batches), row ``b`` of feature ``f``
    becomes ``pooled[inverse[f][b]]``, as in TorchRec's ``EmbeddingBagCollection``; without
    them ``pooled`` is returned as it is."""
    if not torch.jit.is_scripting():
        if not isinstance(features, KeyedJaggedTensor):
            return pooled  # a TensorDict carries no inverse indices
    inverse = features.inverse_indices_or_none()
    if inverse is None:
        return pooled
    row_of = {name: i for i, name in enumerate(inverse[0])}
    parts: List[Tensor] = []
    for f, block in zip(feature_names, pooled.split(dims, dim=1)):
        if f not in row_of:
            raise ValueError("KeyedJaggedTensor inverse_indices lack the feature '" + f + "'")
        parts.append(block.index_select(0, inverse[1][row_of[f]]))
    return torch.cat(parts, dim=1)


def _unique(names: List[str]) -> List[str]:
    out: List[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def warn_left_float(module: str, tables: List[str], qconfig: Any) -> None:
    """Warns that torch.ao.quantization's convert left a TT collection float32 (see
    ``TTEmbeddingBagCollection.qconfig``): ``qconfig`` is what the pass had set on it."""
    why = (
        "its type is not in the qconfig_spec (TorchRec's quantize_embeddings knows only "
        "torchrec's EmbeddingBagCollection)"
        if qconfig is None
        else "it had a qconfig but was not swapped (the mapping has no entry for its type, or it "
        "is the root module: convert swaps submodules only)"
    )
    warnings.warn(
        f"{module} (TT tables {tables}) was left float32 by torch.ao.quantization's convert "
        f"(which torchrec.inference.modules.quantize_embeddings runs): {why}. To quantize TT "
        "tables, call torchrec_tt.inference.quantize_embeddings (TorchRec's arguments) or "
        "torchrec.inference.modules.quantize_inference_model, or pass "
        "additional_qconfig_spec_keys=[TTEmbeddingBagCollection] and additional_mapping="
        "{TTEmbeddingBagCollection: torchrec_tt.inference.QuantTTEmbeddingBagCollection} to "
        "TorchRec's quantize_embeddings",
        stacklevel=3,
    )


#: DistributedDataParallel objects -> ids of the TT modules already checked inside them.
_DDP_CHECKED: weakref.WeakKeyDictionary[nn.Module, set[int]] = weakref.WeakKeyDictionary()


class NoFusedOptimizerError(AttributeError, RuntimeError):
    """``fused_optimizer`` of a collection built without ``fused_params``: an AttributeError so
    that ``hasattr(ebc, "fused_optimizer")`` is False (TorchScript and TorchRec probe it that
    way), a RuntimeError as before."""


def _default_init_fn(cfg: EmbeddingBagConfig) -> bool:
    """Whether ``cfg.init_fn`` is None or TorchRec's default (uniform within the config's init
    bounds), whose variance the TT initialisers match."""
    fn = getattr(cfg, "init_fn", None)
    return fn is None or (
        isinstance(fn, functools.partial)
        and fn.func is torch.nn.init.uniform_
        and fn.keywords == {"a": cfg.get_weight_init_min(), "b": cfg.get_weight_init_max()}
    )


class TTEmbeddingTable(nn.Module):
    """The cores of one TT table, as 2-D parameters ``core_0 … core_{K-1}``
    (``core_k`` is ``[p_k, r_{k-1} * q_k * r_k]``)."""

    def __init__(
        self, shape: TTShape, device: torch.device | None = None, cache_rows: int = 0
    ) -> None:
        super().__init__()
        self.shape = shape
        for k, (rows, cols) in enumerate(shape.core_shapes()):
            self.register_parameter(
                f"core_{k}", nn.Parameter(torch.empty(rows, cols, device=device))
            )
        #: Rows of the hot-row cache (0: none); see ``torchrec_tt.modules.hot_cache``.
        self.cache_rows = cache_rows
        if cache_rows > 0:
            hot_cache.add_cache_buffers(self, cache_rows, shape.embedding_dim, device)

    def cores(self) -> List[Tensor]:
        # hasattr on a module is resolved when TorchScript compiles: 2-4 cores, no getattr loop.
        out = [self.core_0, self.core_1]
        if hasattr(self, "core_2"):
            out.append(self.core_2)
        if hasattr(self, "core_3"):
            out.append(self.core_3)
        return out

    def full_weight(self) -> Tensor:
        """Dense ``[N, D]`` reconstruction (differentiable; memory ``N * D``) of the TT cores
        (without the hot-row cache; ``TTEmbeddingBagCollection.full_weight`` adds it)."""
        s = self.shape
        return reconstruct_dense(self.cores(), s.p, s.q, s.ranks, s.num_rows)

    @torch.jit.unused
    def trained_params(self) -> Dict[str, nn.Parameter]:
        """The parameters a fused optimizer updates: the cores, then the cache slab if any."""
        return dict(self.named_parameters(recurse=False))


class _TTLookupMixin:
    """The TT op call of a collection from plain attributes TorchScript can read (the frozen
    dataclasses cannot be scripted); shared by the float and the quantized collections."""

    _feature_names: List[str]
    _feature_tables: List[str]
    _embedding_names: List[str]
    _lengths_per_key: List[int]
    _is_weighted: bool

    def _set_op_args(self, layout: TTBatchLayout, bounds_check_mode: int) -> None:
        args = layout.op_args()
        self._op_num_cores: List[int] = args[0]
        self._op_p_shapes: List[int] = args[1]
        self._op_q_shapes: List[int] = args[2]
        self._op_ranks: List[int] = args[3]
        self._op_num_rows: List[int] = args[4]
        self._op_feature_table_map: List[int] = args[5]
        self._op_table_names: List[str] = args[6]
        self._op_pooling_modes: List[int] = args[7]
        self._op_bounds_check_mode = int(bounds_check_mode)

    def _op(
        self,
        cores: List[Tensor],
        pooling_modes: List[int],
        indices: Tensor,
        offsets: Tensor,
        weights: Optional[Tensor],
        compute_precision: int,
        deterministic: bool,
    ) -> Tensor:
        """The table-batched op over this collection's tables (``pooling_modes`` per table)."""
        return torch.ops.torchrec_tt.tt_embedding_bag(
            cores,
            self._op_num_cores,
            self._op_p_shapes,
            self._op_q_shapes,
            self._op_ranks,
            self._op_num_rows,
            self._op_feature_table_map,
            self._op_table_names,
            pooling_modes,
            indices,
            offsets,
            weights,
            self._op_bounds_check_mode,
            compute_precision,
            deterministic,
        )

    def _pooled(
        self,
        features: KeyedJaggedTensor,
        cores: List[Tensor],
        compute_precision: int,
        deterministic: bool,
    ) -> Tuple[List[str], List[int], Tensor]:
        """``(keys, length_per_key, values)`` of the pooled lookups of ``features``."""
        # The checks and the reordering depend on the KJT's keys, which torch.fx cannot see, so
        # they live in an fx-wrapped helper (a leaf for TorchRec's tracer, as in TorchRec's own
        # EBC); the op itself stays visible in the traced graph.
        inputs = _lookup_inputs(
            features, self._feature_names, self._feature_tables, self._is_weighted, cores[0]
        )
        weights = inputs[2] if self._is_weighted else None
        values = self._op(
            cores, self._op_pooling_modes, inputs[0], inputs[1], weights, compute_precision,
            deterministic,
        )
        values = _expand_inverse_indices(values, features, self._feature_names, self._lengths_per_key)
        return self._embedding_names, self._lengths_per_key, values


class TTEmbeddingBagCollection(EmbeddingBagCollectionInterface, _TTLookupMixin):
    """EmbeddingBagCollection whose tables are Tensor Trains, looked up by one table-batched op.

    Takes the same arguments as ``torchrec.EmbeddingBagCollection`` and keeps its contract:
    ``KeyedJaggedTensor`` (keys: the tables' feature names in any order, plus any others, which
    are ignored as in TorchRec's EBC; shape ``(F, B, L[f][i])``; a TensorDict of jagged features
    is converted as TorchRec's EBC does) in, ``KeyedTensor`` (keys: the feature names in table
    order, ``feature@table`` for a feature shared by several tables, as TorchRec names them;
    values ``[B, sum of D]``) out; per-sample weights are used when ``is_weighted``.
    Variable batch per feature (VBE) works as in TorchRec's EBC: the KJT's inverse indices give
    each sample's row (sharded too).

    Inference: the module scripts (``torch.jit.script``, also after ``torchrec.fx.symbolic_trace``)
    and exports (``torch.export``); ``torchrec_tt.inference`` quantizes it.

    NOTE: this module is unsharded; ``torchrec_tt.sharding`` distributes it.

    Args:
        tables: one ``TTEmbeddingBagConfig`` per table.
        is_weighted: use the KJT's weights as per-sample weights.
        device: where the cores live; ``torch.device("meta")`` builds without memory.
        fused_params: optional FBGEMM-style settings. With an ``"optimizer"``, e.g.
            ``{"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.05}``, the cores are
            updated during the backward (see ``torchrec_tt.optim``), the state joins the
            state_dict and ``fused_optimizer`` exposes it as a KeyedOptimizer. The kernel keys
            ``bounds_check_mode``, ``compute_precision`` and ``deterministic`` (see
            ``torchrec_tt.ops.TTKernelOptions``) may come with or without an optimizer.

    Example::

        tables = [TTEmbeddingBagConfig(name="t1", num_embeddings=1_000_000, embedding_dim=64,
                                       feature_names=["f1"], tt_ranks=[16, 16])]
        ebc = TTEmbeddingBagCollection(tables)
        kjt = KeyedJaggedTensor.from_lengths_sync(["f1"], torch.tensor([3, 7, 9]),
                                                  torch.tensor([2, 1]))
        ebc(kjt)["f1"].shape  # torch.Size([2, 64])
    """

    def __init__(
        self,
        tables: Sequence[TTEmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        fused_params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("TTEmbeddingBagCollection needs at least one table")
        names: set[str] = set()
        features: list[str] = []
        feature_table_map: list[int] = []
        for t, cfg in enumerate(tables):
            if not isinstance(cfg, TTEmbeddingBagConfig):
                raise TypeError(
                    f"table {getattr(cfg, 'name', cfg)!r} is a {type(cfg).__name__}; "
                    "TTEmbeddingBagCollection takes TTEmbeddingBagConfig (plain tables belong in "
                    "an EmbeddingBagCollection)"
                )
            if cfg.mlet_inner_dim is not None:
                raise TypeError(
                    f"TT table {cfg.name!r} has mlet_inner_dim={cfg.mlet_inner_dim} (an MLET "
                    "table: a TT table of that width and a projection); build it with "
                    "MLETEmbeddingBagCollection or HybridEmbeddingBagCollection"
                )
            if cfg.name in names:
                raise ValueError(f"Duplicate table name {cfg.name!r}")
            names.add(cfg.name)
            if len(set(cfg.feature_names)) != len(cfg.feature_names):
                raise ValueError(
                    f"table {cfg.name!r} lists a feature more than once: {cfg.feature_names}"
                )
            # A feature of several tables is looked up in each (TorchRec's shared features; the
            # outputs are keyed "feature@table").
            features.extend(cfg.feature_names)
            feature_table_map.extend([t] * len(cfg.feature_names))
        # As TorchRec's EBC: no device means the default one (``with torch.device("meta"):``).
        device = torch.device(device) if device is not None else torch.get_default_device()
        ignored_init = [cfg.name for cfg in tables if not _default_init_fn(cfg)]
        if ignored_init:
            warnings.warn(
                f"TT tables {ignored_init} have an init_fn, which TT cores cannot take (it is "
                "written for a dense [N, D] weight); they use tt_init instead",
                stacklevel=2,
            )
        self._is_weighted = is_weighted
        self._embedding_bag_configs = list(tables)
        #: Feature looked up at each output position (a shared feature once per table).
        self._feature_names = features
        #: Output keys, as TorchRec's EBC names them (``feature@table`` for shared features).
        self._embedding_names: List[str] = [
            n for names in get_embedding_names_by_table(list(tables)) for n in names
        ]
        self._feature_tables = [tables[t].name for t in feature_table_map]
        self._shapes = [cfg.tt_shape() for cfg in tables]
        self._layout = TTBatchLayout.from_shapes(
            [cfg.name for cfg in tables],
            self._shapes,
            [_POOLING[cfg.pooling] for cfg in tables],
            feature_table_map,
        )
        self._lengths_per_key = self._layout.feature_dims()
        self.embedding_bags = nn.ModuleDict(
            {
                cfg.name: TTEmbeddingTable(shape, device, cfg.tt_cache_rows)
                for cfg, shape in zip(tables, self._shapes)
            }
        )
        # Hot-row cache (eager only: TorchScript compiles the no-cache forward).
        self._has_cache: bool = any(cfg.tt_cache_rows > 0 for cfg in tables)
        if self._has_cache:  # (what the cached forward needs of the layout, once)
            table_index = {cfg.name: t for t, cfg in enumerate(tables)}
            self._cache_layout = hot_cache.CachedLookupLayout(
                [table_index[n] for n in self._feature_tables],
                [cfg.pooling == PoolingType.MEAN for cfg in tables],
                self._lengths_per_key,
                [t for t, cfg in enumerate(tables) if cfg.tt_cache_rows > 0],
            )
            self._cache_sum_modes: List[int] = [int(PoolingMode.SUM)] * len(tables)
        #: Refresh statistics per cached table, from the last refresh.
        self.last_cache_refresh: Dict[str, hot_cache.CacheRefreshStats] = {}
        # (A type comment: TorchScript warns on annotated None attributes in __init__.)
        self._fused_optimizer = None  # type: Optional[TTFusedOptimizer]
        self._kernel_options = TTKernelOptions.from_fused_params(fused_params)
        self._set_op_args(self._layout, self._kernel_options.bounds_check_mode)
        self._op_compute_precision = int(self._kernel_options.compute_precision)
        self._op_deterministic = bool(self._kernel_options.deterministic)
        # A fused optimizer unless fused_params holds kernel keys only (an empty dict still asks
        # for one, and gets FusedOptimConfig's "needs an 'optimizer'" error).
        kernel_only = bool(fused_params) and set(fused_params) <= set(TTKernelOptions.KEYS)
        if fused_params is not None and not kernel_only:
            cfg = FusedOptimConfig.from_fused_params(fused_params)
            for table in self.embedding_bags.values():
                for pname, param in table.trained_params().items():
                    for key, shape in cfg.state_shapes(param.shape).items():
                        table.register_buffer(f"{pname}_{key}", torch.zeros(shape, device=device))

            self._fused_cfg = cfg
            # A bound method (not a closure): copy.deepcopy and pickle then give the copy's
            # optimizer the copy's buffers.
            self._fused_optimizer = TTFusedOptimizer(cfg, self._core_params(), self._fused_state)
        self.reset_parameters()

    # TorchScript compiles a module's properties; these are Python-side only.
    __jit_unused_properties__ = ["device", "kernel_options", "fused_optimizer", "qconfig"]
    # Python-side only (the cache's statistics dataclasses cannot be scripted).
    __jit_ignored_attributes__ = ["last_cache_refresh"]

    @property
    def device(self) -> torch.device:
        """Where the cores are (follows ``.to()``), as TorchRec's ``EmbeddingBagCollection.device``."""
        return next(iter(self.embedding_bags.values())).core_0.device

    # torch.ao.quantization's eager passes (TorchRec's quantize_embeddings runs
    # quantize_dynamic) set ``qconfig`` on every module they visit and, at the end of convert,
    # delete it from every module they did not swap: a TT collection reached by that delete was
    # left float32, which TorchRec's function would do silently. A property sees the delete.
    @property
    def qconfig(self) -> Any:
        """The quantization config torch.ao.quantization set (absent unless a pass set one)."""
        if "_tt_qconfig" not in self.__dict__:
            raise AttributeError("qconfig")  # hasattr() False, as on any module
        return self.__dict__["_tt_qconfig"]

    @qconfig.setter
    def qconfig(self, value: Any) -> None:
        self.__dict__["_tt_qconfig"] = value

    @qconfig.deleter
    def qconfig(self) -> None:
        qconfig = self.__dict__.pop("_tt_qconfig", None)
        warn_left_float(type(self).__name__, [c.name for c in self._embedding_bag_configs], qconfig)

    @property
    def kernel_options(self) -> TTKernelOptions:
        """Bounds checking, compute precision and determinism of this collection's op calls."""
        return self._kernel_options

    def _fused_state(self, name: str) -> Dict[str, Tensor]:
        """The fused optimizer's state buffers of core ``embedding_bags.<table>.core_<k>``."""
        _, table, core = name.split(".")
        owner = self.embedding_bags[table]
        shape = getattr(owner, core).shape
        return {key: getattr(owner, f"{core}_{key}") for key in self._fused_cfg.state_shapes(shape)}

    def _core_params(self) -> dict[str, nn.Parameter]:
        return {
            f"embedding_bags.{name}.{pname}": param
            for name, table in self.embedding_bags.items()
            for pname, param in table.trained_params().items()
        }

    def _apply(self, fn: Any, recurse: bool = True) -> "TTEmbeddingBagCollection":
        # Moving the module (to_empty from meta, .to(device), .double()) can replace the core
        # Parameter objects; the fused optimizer's hooks must follow them.
        out = super()._apply(fn, recurse)
        if self._fused_optimizer is not None:
            self._fused_optimizer.rebind(self._core_params())
        return out

    def __getattr__(self, name: str) -> Any:
        # A property that raises AttributeError falls through to here (nn.Module's lookup of
        # parameters / buffers / submodules); keep fused_optimizer's own message.
        if name == "fused_optimizer":
            raise NoFusedOptimizerError("this TTEmbeddingBagCollection was built without fused_params")
        return super().__getattr__(name)

    @property
    def fused_optimizer(self) -> TTFusedOptimizer:
        """The fused optimizer (a TorchRec KeyedOptimizer); only with ``fused_params``."""
        if self._fused_optimizer is None:
            raise NoFusedOptimizerError("this TTEmbeddingBagCollection was built without fused_params")
        return self._fused_optimizer

    # --- EmbeddingBagCollectionInterface ----------------------------------------------------

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._embedding_bag_configs)

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of every feature; see the class docstring for the contract (a
        TensorDict of jagged features is taken too, as by TorchRec's EBC)."""
        deterministic = self._op_deterministic
        if not torch.jit.is_scripting():
            if not torch.compiler.is_compiling():
                self._check_outer_ddp()
            deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
        if self._has_cache:
            if torch.jit.is_scripting():
                raise RuntimeError(
                    "TT tables with a hot-row cache (tt_cache_rows > 0) run in eager mode only; "
                    "script a collection without a cache"
                )
            return self._cached_forward(features, deterministic)
        cores: List[Tensor] = []
        for table in self.embedding_bags.values():
            cores.extend(table.cores())
        keys, lengths, values = self._pooled(
            features, cores, self._op_compute_precision, deterministic
        )
        return KeyedTensor(keys=keys, length_per_key=lengths, values=values)

    @torch.jit.unused
    def _cached_forward(self, features: KeyedJaggedTensor, deterministic: bool) -> KeyedTensor:
        """``forward`` with hot-row caches: each cached table's ids found in its slab are pooled
        from it with ``embedding_bag`` (per-sample weights kept; MEAN divides by the full bag
        length), the other ids go through the TT op (their bags re-offset, pooled as SUM with the
        weights pre-divided by the full bag length for MEAN tables), and the two are added. In
        training mode, refreshes the caches when due (see ``hot_cache``), then counts the ids
        (the refresh schedule reads a host-side copy of each table's step counter: no host
        synchronisation for it)."""
        if self.training:
            self._refresh_due_caches()
        cores = self.cores()
        values, offsets, weights = _lookup_inputs(
            features, self._feature_names, self._feature_tables, self._is_weighted, cores[0]
        )
        layout = self._cache_layout
        configs = self._embedding_bag_configs
        caches = {t: self.embedding_bags[configs[t].name] for t in layout.cached_tables}
        sum_modes = self._cache_sum_modes
        out, seen = hot_cache.cached_pooled(
            values, offsets, weights, cores[0].dtype, layout, caches,
            lambda v, o, w: self._op(
                cores, sum_modes, v, o, w, self._op_compute_precision, deterministic
            ),
        )
        if self.training:
            for t, ids in seen.items():
                hot_cache.record_ids(caches[t], ids)
        out = _expand_inverse_indices(out, features, self._feature_names, self._lengths_per_key)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_key, values=out)

    @torch.jit.unused
    def _refresh_due_caches(self) -> None:
        for cfg in self._embedding_bag_configs:
            if cfg.tt_cache_rows > 0 and hot_cache.refresh_due(
                self.embedding_bags[cfg.name], cfg.tt_cache_refresh_steps
            ):
                self.refresh_cache(cfg.name)

    @torch.jit.unused
    def refresh_cache(self, table_name: str) -> hot_cache.CacheRefreshStats:
        """Refreshes one table's hot-row cache now (training forwards do it every
        ``tt_cache_refresh_steps``): the most frequent ids are cached, evicted rows written back
        into TT, admitted rows copied from TT. Call it between a backward and the next forward."""
        table = self._table(table_name)
        if table.cache_rows == 0:
            raise ValueError(f"TT table {table_name!r} has no hot-row cache (tt_cache_rows=0)")
        cfg = next(c for c in self._embedding_bag_configs if c.name == table_name)
        state: List[Tensor] = []
        if self._fused_optimizer is not None:
            state = list(self._fused_state(f"embedding_bags.{table_name}.cache_weight").values())
        stats = hot_cache.refresh_cache(table, table.cores(), table.shape, cfg.tt_cache_decay, state)
        self.last_cache_refresh[table_name] = stats
        return stats

    @torch.jit.unused
    def cached_ids(self, table_name: str) -> Tensor:
        """The ids a table's hot-row cache holds now, ascending (empty without a cache)."""
        table = self._table(table_name)
        if table.cache_rows == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        ids = table.cache_sorted_ids
        return ids[ids >= 0].clone()

    def _check_outer_ddp(self) -> None:
        """Refuses a fused optimizer, and warns otherwise, when this (unsharded) module's cores are
        parameters of the DistributedDataParallel whose forward is running: what
        ``DistributedModelParallel`` does to a TT module when no ``TTEmbeddingBagCollectionSharder``
        is passed (its default sharders do not know TT, so the whole module lands in its DDP).
        Uses DDP's ``_get_active_ddp_module`` (set during a C++-reducer DDP forward); the check
        runs once per DDP object."""
        get_active = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
        ddp = get_active() if get_active is not None else None
        if ddp is None:
            return
        checked = _DDP_CHECKED.setdefault(ddp, set())  # (not an attribute: copies must work)
        if id(self) in checked:
            return
        ignored = set(getattr(ddp, "parameters_to_ignore", ()))
        managed = {id(p) for n, p in ddp.module.named_parameters() if n not in ignored}
        if not any(id(c) in managed for c in self.cores()):
            checked.add(id(self))
            return
        names = [c.name for c in self._embedding_bag_configs]
        what = ("its cores are plain DistributedDataParallel parameters (replicated, gradients "
                "all-reduced by DDP)")
        fix = ("to shard it, pass torchrec_tt.sharding.TTEmbeddingBagCollectionSharder() in "
               "DistributedModelParallel(..., sharders=[...]) and a plan from "
               "torchrec_tt.sharding.plan")
        if self._fused_optimizer is not None:
            raise RuntimeError(
                f"TTEmbeddingBagCollection (tables {names}) with a fused optimizer "
                f"runs inside DistributedDataParallel: {what}, but the fused update in the "
                f"backward would apply each rank's local gradient (before DDP's all-reduce), so "
                f"replicas diverge; {fix}"
            )
        warnings.warn(
            f"TTEmbeddingBagCollection (tables {names}) runs inside "
            f"DistributedDataParallel unsharded: {what}. If this is DistributedModelParallel, "
            f"the TT sharder was not passed; {fix}",
            stacklevel=3,
        )
        checked.add(id(self))

    # --- TT-specific ------------------------------------------------------------------------

    def cores(self) -> list[Tensor]:
        """All cores, table after table (the op's ``cores`` argument)."""
        return [c for table in self.embedding_bags.values() for c in table.cores()]

    def tt_shapes(self) -> dict[str, TTShape]:
        return {cfg.name: s for cfg, s in zip(self._embedding_bag_configs, self._shapes)}

    def full_weight(self, table_name: str) -> Tensor:
        """Dense ``[N, D]`` table as the model sees it (differentiable): the TT
        reconstruction, with the rows in the hot-row cache taken from its slab."""
        table = self._table(table_name)
        weight = table.full_weight()
        if table.cache_rows > 0:
            held = table.cache_ids >= 0
            weight = weight.index_copy(0, table.cache_ids[held], table.cache_weight[held])
        return weight

    @torch.no_grad()
    def load_dense_weight(self, table_name: str, weight: Tensor) -> float:
        """Sets a table's cores to the TT-SVD of a dense ``[N, D]`` weight at its ranks and
        returns the relative reconstruction error ``||W - TT|| / ||W||`` (Frobenius; 0 for a
        zero weight)."""
        table = self._table(table_name)
        s = table.shape
        if tuple(weight.shape) != (s.num_rows, s.embedding_dim):
            raise ValueError(
                f"table {table_name!r}: dense weight has shape {tuple(weight.shape)}, expected "
                f"({s.num_rows}, {s.embedding_dim})"
            )
        dense = weight.detach().cpu()
        new_cores = tt_svd(dense, s)
        for core, new in zip(table.cores(), new_cores):
            core.copy_(new)
        if table.cache_rows > 0:  # cached rows take the dense rows themselves
            held = table.cache_ids >= 0
            table.cache_weight[held] = weight.detach().to(table.cache_weight)[table.cache_ids[held]]
        norm = float(dense.double().norm())
        if norm == 0.0:
            return 0.0
        approx = reconstruct_dense([c.double() for c in new_cores], s.p, s.q, s.ranks, s.num_rows)
        return float((approx - dense.double()).norm()) / norm

    def compression_stats(self) -> dict[str, dict[str, float]]:
        """Per table and ``"total"``: TT parameters, TT and dense FP32 bytes, the hot-row cache's
        slab bytes (``cache_bytes``) and the compression ratio ``dense / (tt + cache)``."""
        stats: dict[str, dict[str, float]] = {}
        for cfg, s in zip(self._embedding_bag_configs, self._shapes):
            cache = cfg.tt_cache_rows * s.embedding_dim * 4
            stats[cfg.name] = {
                "tt_parameters": s.num_parameters(),
                "tt_bytes": s.num_bytes(4),
                "cache_bytes": cache,
                "dense_bytes": s.dense_num_bytes(4),
                "compression": s.dense_num_bytes(4) / (s.num_bytes(4) + cache),
            }
        tt = sum(v["tt_bytes"] for v in stats.values())
        cache = sum(v["cache_bytes"] for v in stats.values())
        dense = sum(v["dense_bytes"] for v in stats.values())
        stats["total"] = {
            "tt_parameters": sum(v["tt_parameters"] for v in stats.values()),
            "tt_bytes": tt,
            "cache_bytes": cache,
            "dense_bytes": dense,
            "compression": dense / (tt + cache),
        }
        return stats

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialises every table per its ``tt_init`` (a no-op on the meta device)."""
        for cfg, table in zip(self._embedding_bag_configs, self.embedding_bags.values()):
            cores = table.cores()
            if cores[0].device.type == "meta":
                continue
            std = default_target_std(cfg.num_embeddings, cfg.weight_init_min, cfg.weight_init_max)
            init = sampled_gaussian_cores if cfg.tt_init == TTInit.SAMPLED_GAUSSIAN else orthogonal_cores
            for core, new in zip(cores, init(table.shape, std, dtype=cores[0].dtype, device=cores[0].device)):
                core.copy_(new)
            if table.cache_rows > 0:
                hot_cache.reset_cache(table)

    def _table(self, table_name: str) -> TTEmbeddingTable:
        if table_name not in self.embedding_bags:
            raise KeyError(
                f"no TT table {table_name!r}; tables: {list(self.embedding_bags.keys())}"
            )
        return self.embedding_bags[table_name]  # type: ignore[return-value]


