"""TorchRec distributed integration for TT tables (imported as ``torchrec_tt.sharding``).

Shard a model holding ``TTEmbeddingBagCollection`` s (and plain EBCs) with TorchRec's
``DistributedModelParallel``, using a plan made here::

    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import Topology
    from torchrec_tt import sharding

    sharders = [sharding.TTEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    plan = sharding.plan(model, Topology(world_size=8, compute_device="cuda"), batch_size=2048)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)

TT tables support data_parallel (usually best: no all-to-all, an all-reduce of the small cores),
table_wise and column_wise (a split of the first column factor; see
``ShardedTTEmbeddingBagCollection``). Tables with a hot-row cache (``tt_cache_rows``) shard
data_parallel or table_wise, with the unsharded module's cache behaviour.
Fused optimizers (``fused_params`` of the module or of ``TTEmbeddingBagCollectionSharder``, or
``apply_optimizer_in_backward``) run in the backward under every sharding type and show in
``DistributedModelParallel.fused_optimizer``; see ``torchrec_tt.sharding.fused``.
``plan`` uses ``TTShardEstimator`` for TT tables (their true storage, a FLOP-based compute model
and their comms) and TorchRec's estimators for plain ones; TorchRec's default planner cannot cost
TT tables, so ``DistributedModelParallel(plan=None)`` fails and says to call ``plan``.
``plan_comms_bytes`` and ``CommsMeter`` compute and measure the bytes a plan moves per step.
``error_bounded_qcomm_codecs`` is a qcomms registry (any sharder's ``qcomm_codecs_registry=``)
that sends the pooled all-to-all error-bounded quantised, under an adaptive
``ErrorBoundPolicy`` (``torchrec_tt.sharding.lossy_comms``).
"""

from torchrec_tt.sharding.comms import CommsMeter, StepComms, plan_comms_bytes
from torchrec_tt.sharding.embeddingbag import (
    ShardedTTEmbeddingBagCollection,
    TTEmbeddingBagCollectionSharder,
)
from torchrec_tt.sharding.estimator import TTShardEstimator, measure_tt_flops
from torchrec_tt.sharding.fused import tt_skipped_steps
from torchrec_tt.sharding.lossy_comms import (
    ErrorBoundPolicy,
    error_bounded_qcomm_codecs,
    lossy_policy,
)
from torchrec_tt.sharding.planner import TTEmbeddingEnumerator, plan

__all__ = [
    "CommsMeter",
    "ErrorBoundPolicy",
    "ShardedTTEmbeddingBagCollection",
    "StepComms",
    "TTEmbeddingBagCollectionSharder",
    "TTEmbeddingEnumerator",
    "TTShardEstimator",
    "error_bounded_qcomm_codecs",
    "lossy_policy",
    "measure_tt_flops",
    "plan",
    "plan_comms_bytes",
    "tt_skipped_steps",
]
