"""Models, batches, plans and checks shared by the distributed tests (imported by the spawned
workers too, so everything here is module level and picklable by name)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    table_wise,
)
from torchrec.distributed.types import ShardedTensor, ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.sharding import TTEmbeddingBagCollectionSharder

BATCH = 4

# t0: K=3, q=(2,2,4) (2 column shards at most); t1: K=2, two features, MEAN pooling;
# t2: K=3, q=(4,2,4) (up to 4 column shards of 8 columns), MEAN pooling.
TT_TABLES = [
    TTEmbeddingBagConfig(
        name="t0", num_embeddings=97, embedding_dim=16, feature_names=["f0"], tt_ranks=[3, 2]
    ),
    TTEmbeddingBagConfig(
        name="t1",
        num_embeddings=40,
        embedding_dim=8,
        feature_names=["f1", "f1b"],
        tt_ranks=[2],
        pooling=PoolingType.MEAN,
    ),
    TTEmbeddingBagConfig(
        name="t2",
        num_embeddings=70,
        embedding_dim=32,
        feature_names=["f2"],
        tt_ranks=[2, 3],
        tt_q_shapes=[4, 2, 4],
        pooling=PoolingType.MEAN,
    ),
]
PLAIN_TABLES = [
    EmbeddingBagConfig(name="e0", num_embeddings=30, embedding_dim=8, feature_names=["p0"]),
    EmbeddingBagConfig(name="e1", num_embeddings=20, embedding_dim=8, feature_names=["p1"]),
    EmbeddingBagConfig(name="e2", num_embeddings=25, embedding_dim=16, feature_names=["p2"]),
]
TT_FEATURES = ["f0", "f1", "f1b", "f2"]
PLAIN_FEATURES = ["p0", "p1", "p2"]
ROWS = {
    **{f: c.num_embeddings for c in TT_TABLES for f in c.feature_names},
    **{f: c.num_embeddings for c in PLAIN_TABLES for f in c.feature_names},
}
DIMS = {
    **{f: c.embedding_dim for c in TT_TABLES for f in c.feature_names},
    **{f: c.embedding_dim for c in PLAIN_TABLES for f in c.feature_names},
}
#: Bag length of every feature in the fixed-length batches used for exact comms accounting.
FIXED_LENGTHS = {"f0": 2, "f1": 3, "f1b": 1, "f2": 2, "p0": 2, "p1": 1, "p2": 3}


class Model(nn.Module):
    """A TT collection, optionally a plain EBC, and a linear head over all pooled features."""

    def __init__(
        self,
        plain: bool = True,
        weighted: bool = False,
        device: str | None = None,
        fused_params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.tt = TTEmbeddingBagCollection(
            TT_TABLES, is_weighted=weighted, device=device, fused_params=fused_params
        )
        self.ebc = EmbeddingBagCollection(PLAIN_TABLES, device=device) if plain else None
        features = TT_FEATURES + (PLAIN_FEATURES if plain else [])
        self.features = features
        self.head = nn.Linear(sum(DIMS[f] for f in features), 1, device=device)

    def forward(self, tt_kjt: KeyedJaggedTensor, plain_kjt: KeyedJaggedTensor | None = None) -> Tensor:
        pooled = self.tt(tt_kjt)
        parts = [pooled[f] for f in TT_FEATURES]
        if self.ebc is not None:
            plain = self.ebc(plain_kjt)
            parts += [plain[f] for f in PLAIN_FEATURES]
        return self.head(torch.cat(parts, dim=1)).square().mean()


def make_model(seed: int, plain: bool = True, weighted: bool = False,
               fused_params: Mapping[str, Any] | None = None) -> Model:
    torch.manual_seed(seed)
    return Model(plain=plain, weighted=weighted, fused_params=fused_params)


def random_kjt(
    keys: Sequence[str], seed: int, batch: int = BATCH, weighted: bool = False,
    fixed: bool = False,
) -> KeyedJaggedTensor:
    """Bags of 0..3 ids (or ``FIXED_LENGTHS``), keys in the given order."""
    gen = torch.Generator().manual_seed(seed)
    if fixed:
        lengths = torch.tensor([FIXED_LENGTHS[k] for k in keys for _ in range(batch)])
    else:
        lengths = torch.randint(0, 4, (len(keys) * batch,), generator=gen)
    values = torch.cat(
        [
            torch.randint(0, ROWS[k], (int(lengths[i * batch : (i + 1) * batch].sum()),),
                          generator=gen)
            for i, k in enumerate(keys)
        ]
    )
    weights = torch.rand(values.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(list(keys), values, lengths, weights=weights)


def batch_for(rank: int, step: int, plain: bool, weighted: bool = False, fixed: bool = False,
              extra_keys: bool = False) -> tuple[KeyedJaggedTensor, ...]:
    """``extra_keys``: the TT collection's KJT also holds the plain features, which it ignores
    (as when one KJT feeds several collections)."""
    seed = 1000 * step + 17 * rank
    # Keys in a different order from the module's, as a user's KJT may be.
    keys = list(reversed(TT_FEATURES))
    if extra_keys:
        keys = [PLAIN_FEATURES[0], *keys[:2], *PLAIN_FEATURES[1:], *keys[2:]]
    tt = random_kjt(keys, seed, weighted=weighted, fixed=fixed)
    if not plain:
        return (tt,)
    return tt, random_kjt(PLAIN_FEATURES, seed + 1, fixed=fixed)


def _generator(spec: Sequence[Any], plain: bool) -> Any:
    kernel = {"compute_kernel": "dense"} if plain else {}
    if spec[0] == "dp":
        return data_parallel()
    if spec[0] == "tw":
        return table_wise(rank=spec[1], **kernel)
    if spec[0] == "cw":
        return column_wise(ranks=list(spec[1]), **kernel)
    raise ValueError(spec)


def manual_plan(
    model: Model, specs: Mapping[str, Sequence[Any]], world_size: int
) -> ShardingPlan:
    """``specs``: table -> ("dp",) | ("tw", rank) | ("cw", [ranks]) (plain tables: dense kernel)."""
    plan = {
        "tt": construct_module_sharding_plan(
            model.tt,
            {t.name: _generator(specs[t.name], False) for t in TT_TABLES},
            sharder=TTEmbeddingBagCollectionSharder(),
            local_size=world_size,
            world_size=world_size,
            device_type="cpu",
        )
    }
    if model.ebc is not None:
        plan["ebc"] = construct_module_sharding_plan(
            model.ebc,
            {t.name: _generator(specs[t.name], True) for t in PLAIN_TABLES},
            sharder=EmbeddingBagCollectionSharder(),
            local_size=world_size,
            world_size=world_size,
            device_type="cpu",
        )
    return ShardingPlan(plan)


def shard(model: nn.Module, plan: ShardingPlan, sharders: list[Any] | None = None
          ) -> DistributedModelParallel:
    return DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=sharders or [TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()],
    )


def assert_state_matches(state: Mapping[str, Any], reference: Mapping[str, Tensor],
                         rtol: float = 1e-5, atol: float = 1e-6) -> int:
    """Compares a (sharded) state dict with an unsharded one; returns the tensors compared."""
    assert set(state) == set(reference), (sorted(state), sorted(reference))
    compared = 0
    for key, value in state.items():
        ref = reference[key]
        if isinstance(value, ShardedTensor):
            assert tuple(value.size()) == tuple(ref.shape), key
            for shard in value.local_shards():
                offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                block = ref[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
                torch.testing.assert_close(shard.tensor, block, rtol=rtol, atol=atol, msg=key)
                compared += 1
        else:
            torch.testing.assert_close(value, ref, rtol=rtol, atol=atol, msg=key)
            compared += 1
    return compared


def reference_step(reference: nn.Module, optimizer: torch.optim.Optimizer,
                   batches: Sequence[Sequence[KeyedJaggedTensor]]) -> Tensor:
    """One step of the unsharded model on the mean of the ranks' losses."""
    loss = sum(reference(*b) for b in batches) / len(batches)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()
