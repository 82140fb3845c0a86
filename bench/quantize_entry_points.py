"""What each quantization entry point a TorchRec user may call does to a DLRM whose sparse arch
is a bare ``TTEmbeddingBagCollection`` (CPU): the sparse module's type afterwards, its stored
bytes against the fp32 cores, the largest change of the pooled embeddings (relative to their
largest magnitude) and of the logits on one batch, and whether it warned.

    python bench/quantize_entry_points.py [--rows 150000 200000] [--dim 8] [--rank 8] [--batch 256]
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable

import torch
import torchrec.inference.modules as trec_inference
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBagCollection, TTEmbeddingBagConfig
from torchrec_tt.inference import QuantTTEmbeddingBagCollection, quantize_embeddings


def _model(rows: list[int], dim: int, rank: int) -> DLRM:
    torch.manual_seed(0)
    tables = [TTEmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=dim,
                                   feature_names=[f"f{i}"], tt_ranks=[rank, rank])
              for i, n in enumerate(rows)]
    return DLRM(embedding_bag_collection=TTEmbeddingBagCollection(tables), dense_in_features=3,
                dense_arch_layer_sizes=[16, dim], over_arch_layer_sizes=[16, 1]).eval()


def _batch(rows: list[int], batch: int) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 6, (len(rows) * batch,), generator=gen)
    per_key = lengths.view(len(rows), batch).sum(1).tolist()
    values = torch.cat([torch.randint(0, r, (n,), generator=gen) for r, n in zip(rows, per_key)])
    kjt = KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(len(rows))], values, lengths)
    return torch.randn(batch, 3, generator=gen), kjt


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[150_000, 200_000])
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    model = _model(args.rows, args.dim, args.rank)
    dense, kjt = _batch(args.rows, args.batch)
    with torch.no_grad():
        want = model(dense, kjt)
        want_emb = model.sparse_arch.embedding_bag_collection(kjt).values()
    fp32 = _bytes(model.sparse_arch.embedding_bag_collection)
    tt_mapping = {"additional_qconfig_spec_keys": [TTEmbeddingBagCollection],
                  "additional_mapping": {TTEmbeddingBagCollection: QuantTTEmbeddingBagCollection}}
    calls: dict[str, Callable[[nn.Module], nn.Module]] = {
        "torchrec quantize_inference_model (int8)":
            lambda m: trec_inference.quantize_inference_model(m),
        "torchrec quantize_inference_model (fp16)":
            lambda m: trec_inference.quantize_inference_model(m, quantization_dtype=torch.float16),
        "torchrec quantize_embeddings (int8), no TT mapping":
            lambda m: trec_inference.quantize_embeddings(m, dtype=torch.qint8, inplace=True),
        "torchrec quantize_embeddings (int8), TT mapping":
            lambda m: trec_inference.quantize_embeddings(m, dtype=torch.qint8, inplace=True,
                                                         **tt_mapping),
        "torchrec_tt quantize_embeddings (int8)":
            lambda m: quantize_embeddings(m, torch.qint8, inplace=True),
    }
    print(f"fp32 TT cores: {fp32:,} bytes; batch {args.batch}; max |logit| {want.abs().max():.4f}")
    print("| entry point | sparse module after | bytes | of fp32 | max emb diff (rel.) "
          "| max abs logit diff | warned |")
    print("|---|---|---|---|---|---|---|")
    for name, call in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = call(copy.deepcopy(model))
        sparse = q.sparse_arch.embedding_bag_collection
        with torch.no_grad():
            diff = float((q(dense, kjt) - want).abs().max())
            emb = float((sparse(kjt).values() - want_emb).abs().max() / want_emb.abs().max())
        warned = any("left float32" in str(w.message) for w in caught)
        size = _bytes(sparse)
        print(f"| {name} | {type(sparse).__name__} | {size:,} | {size / fp32:.3f} | {emb:.2e} "
              f"| {diff:.2e} | {'yes' if warned else 'no'} |")


if __name__ == "__main__":
    main()
