"""Optimizers fused into the backward of TT tables, configured the TorchRec/FBGEMM way.

``TTEmbeddingBagCollection(tables, fused_params={"optimizer": EmbOptimType.EXACT_SGD,
"learning_rate": 0.05})`` updates the cores during ``loss.backward()``: a post-accumulate-grad
hook on each core applies the update to the dense core gradient (small: the size of the core)
and frees it, so no ``optimizer.step()`` is needed and no gradient outlives the backward. The
state (``momentum1`` / ``momentum2`` / step, FBGEMM's names) lives in the module's state_dict;
:class:`TTFusedOptimizer` exposes it as a TorchRec ``KeyedOptimizer`` (``.fused_optimizer``).

Semantics per core ``G`` with gradient ``g`` (after ``g += weight_decay * G``):

* EXACT_SGD: ``G -= lr * g``.
* EXACT_ADAGRAD: ``m1 += g²; G -= lr * g / (sqrt(m1) + eps)`` (``torch.optim.Adagrad``).
* EXACT_ROWWISE_ADAGRAD: one ``m1`` per core slice (row of the 2-D core):
  ``m1 += mean(g_row²); G_row -= lr * g_row / (sqrt(m1) + eps)`` (FBGEMM's row-wise Adagrad).
* ADAM: ``torch.optim.Adam`` with bias correction, applied to every slice (dense: the cores are
  small, so there is no reason for FBGEMM's lazy per-row variant).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor, nn
from torchrec.optim.keyed import KeyedOptimizer

from torchrec_tt.ops import TTKernelOptions

__all__ = ["FusedOptimConfig", "SUPPORTED_FUSED_OPTIMIZERS", "TTFusedOptimizer"]

SUPPORTED_FUSED_OPTIMIZERS = (
    EmbOptimType.EXACT_SGD,
    EmbOptimType.EXACT_ADAGRAD,
    EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    EmbOptimType.ADAM,
)
@dataclass(frozen=True)
class FusedOptimConfig:
    """The fused optimizer of a TT collection (FBGEMM's ``fused_params`` keys).

    Args:
        optimizer: an ``EmbOptimType`` (or its string value) from SUPPORTED_FUSED_OPTIMIZERS.
        learning_rate: step size.
        eps: added to the denominator (Adagrad, Adam).
        beta1: Adam's first-moment decay.
        beta2: Adam's second-moment decay.
        weight_decay: L2 penalty added to the gradient.
    """

    optimizer: EmbOptimType
    learning_rate: float = 0.01
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0

    @staticmethod
    def from_fused_params(fused_params: Mapping[str, Any]) -> FusedOptimConfig:
        """Validates a ``fused_params`` dict; unknown keys and optimizers raise ValueError."""
        # Kernel settings travel in the same dict (as FBGEMM's bounds_check_mode does).
        params = {k: v for k, v in fused_params.items() if k not in TTKernelOptions.KEYS}
        if "betas" in params:
            params["beta1"], params["beta2"] = params.pop("betas")
        if "lr" in params:
            params["learning_rate"] = params.pop("lr")
        names = {f.name for f in fields(FusedOptimConfig)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"fused_params has unsupported keys {unknown}; supported: {sorted(names)}")
        if "optimizer" not in params:
            raise ValueError("fused_params needs an 'optimizer' (an fbgemm_gpu EmbOptimType)")
        try:
            opt = EmbOptimType(params["optimizer"])
        except ValueError:
            raise ValueError(f"unknown optimizer {params['optimizer']!r}") from None
        if opt not in SUPPORTED_FUSED_OPTIMIZERS:
            raise ValueError(
                f"fused optimizer {opt.name} is not supported; choose one of "
                f"{[o.name for o in SUPPORTED_FUSED_OPTIMIZERS]}"
            )
        params["optimizer"] = opt
        cfg = FusedOptimConfig(**params)
        if cfg.learning_rate < 0 or cfg.eps <= 0 or not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
            raise ValueError(f"invalid fused optimizer hyper-parameters: {cfg}")
        return cfg

    def state_shapes(self, core_shape: torch.Size) -> dict[str, tuple[int, ...]]:
        """Shapes of the state buffers of one core."""
        if self.optimizer == EmbOptimType.EXACT_ADAGRAD:
            return {"momentum1": tuple(core_shape)}
        if self.optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD:
            return {"momentum1": (core_shape[0],)}
        if self.optimizer == EmbOptimType.ADAM:
            return {"momentum1": tuple(core_shape), "momentum2": tuple(core_shape), "step": ()}
        return {}


@torch.no_grad()
def fused_update(core: Tensor, grad: Tensor, state: Mapping[str, Tensor], cfg: FusedOptimConfig, lr: float) -> None:
    """Applies one fused-optimizer step to ``core`` in place (state updated in place)."""
    g = grad if cfg.weight_decay == 0 else grad.add(core, alpha=cfg.weight_decay)
    opt = cfg.optimizer
    if opt == EmbOptimType.EXACT_SGD:
        core.add_(g, alpha=-lr)
    elif opt == EmbOptimType.EXACT_ADAGRAD:
        m1 = state["momentum1"]
        m1.addcmul_(g, g)
        core.addcdiv_(g, m1.sqrt().add_(cfg.eps), value=-lr)
    elif opt == EmbOptimType.EXACT_ROWWISE_ADAGRAD:
        m1 = state["momentum1"]
        m1.add_(g.square().mean(dim=1))
        core.sub_(g * (lr / (m1.sqrt() + cfg.eps)).unsqueeze(1))
    elif opt == EmbOptimType.ADAM:
        m1, m2, step = state["momentum1"], state["momentum2"], state["step"]
        step.add_(1)
        m1.lerp_(g, 1 - cfg.beta1)
        m2.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        # Bias corrections as tensor ops: reading the step on the host would sync the GPU.
        bc1 = 1 - torch.pow(cfg.beta1, step)
        bc2 = 1 - torch.pow(cfg.beta2, step)
        denom = (m2 / bc2).sqrt_().add_(cfg.eps)
        core.sub_(lr * m1 / bc1 / denom)
    else:  # FusedOptimConfig.from_fused_params only admits the ones above
        raise AssertionError(opt)


class TTFusedOptimizer(KeyedOptimizer):
    """KeyedOptimizer view of the fused optimizer of a TT collection.

    The updates happen in the backward; ``step()`` and ``zero_grad()`` do nothing (as for
    FBGEMM's fused TBE optimizer). ``param_groups[0]["lr"]`` is read at every update, so
    learning-rate schedulers work.
    """

    def __init__(
        self,
        cfg: FusedOptimConfig,
        params: Mapping[str, nn.Parameter],
        state_of: Callable[[str], dict[str, Tensor]],
    ) -> None:
        # State is looked up by parameter name through `state_of` (the owning module's buffers)
        # rather than held here, so it stays right when the module moves or is materialised.
        self._state_of = state_of
        super().__init__(
            params=dict(params),
            state={},
            param_groups=[{"params": list(params.values()), "lr": cfg.learning_rate}],
        )
        self.cfg = cfg
        self._handles: list[Any] = []
        self.rebind(params)

    def rebind(self, params: Mapping[str, nn.Parameter]) -> None:
        """Moves the update hooks to new parameter objects (after ``to_empty``, ``to``, …)."""
        for h in self._handles:
            h.remove()
        self.params = dict(params)
        self.param_groups[0]["params"] = list(self.params.values())  # type: ignore[index]
        self._names = {p: name for name, p in self.params.items()}
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params.values()]

    @property  # type: ignore[override]
    def state(self) -> dict[Tensor, dict[str, Tensor]]:
        return {p: self._state_of(name) for name, p in self.params.items()}

    @state.setter
    def state(self, value: Mapping[Any, Any]) -> None:
        if value:
            raise ValueError("TTFusedOptimizer state lives in the module's buffers")

    def _on_grad(self, param: Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        state = self._state_of(self._names[param])
        fused_update(param, grad, state, self.cfg, float(self.param_groups[0]["lr"]))  # type: ignore[index]
        param.grad = None

    def step(self, closure: Any = None) -> None:  # noqa: D102 - updates already happened
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 - no gradients kept
        return None
